"""Per-round client sampling, done exactly the way the privacy accountant assumes."""

import json

import numpy as np

from tff_dpmed.errors import UsageError


class ClientSampler:
  """Samples client indices each round; its RNG state is saved in checkpoints.

  poisson: each client joins independently with q = clients_per_round / N (the
    cohort size varies; amplification by sampling is exact for this scheme).
  fixed: exactly clients_per_round clients, uniformly without replacement.
  all: every client, every round (no amplification).
  """

  def __init__(self, num_clients: int, clients_per_round: int, mode: str, seed=None):
    if mode not in ("poisson", "fixed", "all"):
      raise UsageError(f"unknown sampling '{mode}': use poisson, fixed or all")
    self.num_clients = num_clients
    self.clients_per_round = clients_per_round
    self.mode = mode
    self._rng = np.random.default_rng(seed)

  def sample(self) -> np.ndarray:
    if self.mode == "all":
      return np.arange(self.num_clients)
    if self.mode == "fixed":
      return np.sort(self._rng.choice(self.num_clients, self.clients_per_round, replace=False))
    q = self.clients_per_round / self.num_clients
    return np.flatnonzero(self._rng.random(self.num_clients) < q)

  def get_state(self) -> str:
    return json.dumps(self._rng.bit_generator.state)

  def set_state(self, state: str) -> None:
    self._rng.bit_generator.state = json.loads(state)
