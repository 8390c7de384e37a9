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

  Canaries (the canary audit) are sampled apart, with a generator of their
  own, so the real clients' cohorts are drawn exactly as without them: each
  canary joins a round independently with the real clients' rate
  (clients_per_round / N; 1 for `all`), Poisson for every mode.
  """

  def __init__(self, num_clients: int, clients_per_round: int, mode: str, seed=None,
               num_canaries: int = 0):
    if mode not in ("poisson", "fixed", "all"):
      raise UsageError(f"unknown sampling '{mode}': use poisson, fixed or all")
    self.num_clients = num_clients
    self.clients_per_round = clients_per_round
    self.mode = mode
    self.num_canaries = num_canaries
    self._rng = np.random.default_rng(seed)
    # A separate stream: canary draws never shift the real clients' cohorts.
    self._canary_rng = np.random.default_rng(None if seed is None else [seed, 1])

  def sample(self) -> np.ndarray:
    if self.mode == "all":
      return np.arange(self.num_clients)
    if self.mode == "fixed":
      return np.sort(self._rng.choice(self.num_clients, self.clients_per_round, replace=False))
    q = self.clients_per_round / self.num_clients
    return np.flatnonzero(self._rng.random(self.num_clients) < q)

  def sample_canaries(self) -> np.ndarray:
    """The client ids of the canaries that join this round: canary j is id num_clients + j."""
    if not self.num_canaries:
      return np.zeros(0, np.int64)
    q = 1.0 if self.mode == "all" else self.clients_per_round / self.num_clients
    return self.num_clients + np.flatnonzero(self._canary_rng.random(self.num_canaries) < q)

  def get_state(self) -> str:
    state = self._rng.bit_generator.state
    if not self.num_canaries:
      return json.dumps(state)  # As before canaries: old checkpoints stay readable.
    return json.dumps({"clients": state, "canaries": self._canary_rng.bit_generator.state})

  def set_state(self, state: str) -> None:
    data = json.loads(state)
    if self.num_canaries:
      self._canary_rng.bit_generator.state = data["canaries"]
      data = data["clients"]
    self._rng.bit_generator.state = data
