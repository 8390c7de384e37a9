"""Splitting a training set over simulated clients (hospitals).

Both functions return one sorted int64 index array per client. Every example
is assigned to exactly one client, no client is empty, and the result depends
only on the arguments (NumPy's PCG64 generator seeded with `seed`).
"""

import math
from typing import Sequence

import numpy as np

from tff_dpmed.data import guards
from tff_dpmed.errors import UsageError

# NumPy's Dirichlet sampler loops forever (uninterruptibly, in C) for alpha below
# ~1e-10 and takes ~0.1 s per draw at 1e-8; at 1e-3 each class already lands on
# about one client, so smaller values add nothing. Above 1e6 the split is IID
# in all but name, and at ~1e308 the sampler returns all-zero proportions.
MIN_ALPHA = 1e-3
MAX_ALPHA = 1e6
# Dirichlet draws = label groups x clients; beyond this a split takes minutes.
MAX_DIRICHLET_DRAWS = 10**8


def _check_counts(num_examples: int, num_clients: int) -> None:
  if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
    raise UsageError(f"the number of clients must be an integer, got {num_clients!r}: "
                     "pass a whole number such as --num_clients=10")
  if num_clients < 1:
    raise UsageError(f"the number of clients is {num_clients}: pass at least 1 "
                     "(e.g. --num_clients=10)")
  if num_clients > num_examples:
    raise UsageError(f"{num_clients} clients cannot each get one of only {num_examples} "
                     f"training examples: pass --num_clients={num_examples} or fewer")


def partition_iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """Shuffles the examples and deals them out in near-equal shares.

  Client sizes differ by at most one example.

  Raises:
    UsageError: num_clients < 1 or larger than num_examples.
  """
  _check_counts(int(num_examples), num_clients)
  order = np.random.default_rng(guards.check_seed(seed)).permutation(int(num_examples))
  return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def partition_per_example(num_examples: int, num_clients: int) -> list[np.ndarray]:
  """Patients as clients: client k holds example k alone.

  Client-level DP is then example-level (patient-level) DP. `num_clients`
  must be the number of examples, so the privacy unit count the accountant
  uses is stated by the user, never changed behind their back.

  Raises:
    UsageError: num_clients differs from num_examples.
  """
  if num_clients != num_examples:
    raise UsageError(f"--partition=per_example puts one example in each client, so it needs "
                     f"--num_clients={num_examples} (the training examples), not {num_clients}")
  return [np.array([k], np.int64) for k in range(int(num_examples))]


def partition_groups(labels: np.ndarray) -> np.ndarray:
  """The single class each example counts as for label-skewed splitting.

  Single-label `(N,)` or `(N, 1)` labels are their own group. For multi-label
  `(N, K)` 0/1 labels the group is the first positive label, and rows with no
  positive label (e.g. chestmnist's "no finding") form an extra group K: that
  keeps the split a plain function of the labels, and rare findings still
  concentrate on few clients as the label-skew model intends.
  """
  y = np.asarray(labels)
  if y.dtype.kind not in "iub":
    raise UsageError(f"labels for partitioning have dtype {y.dtype}, expected integers: "
                     "pass class indices or 0/1 multi-label flags")
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim == 1:
    if y.size and y.min() < 0:
      raise UsageError(f"labels for partitioning include {y.min()}: class indices must be "
                       ">= 0")
    return y.astype(np.int64)
  if y.ndim == 2:
    positive = y > 0
    return np.where(positive.any(axis=1), positive.argmax(axis=1), y.shape[1]).astype(np.int64)
  raise UsageError(f"labels for partitioning have shape {y.shape}: pass (N,) class indices "
                   "or (N, K) multi-label flags")


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
                        seed: int) -> list[np.ndarray]:
  """Label-skewed split: each class is shared out by Dirichlet(alpha) proportions.

  For every class (see `partition_groups` for multi-label), client shares are
  drawn from a symmetric Dirichlet(alpha) and the class's examples, shuffled,
  are cut at those proportions (Hsu et al. 2019). Small alpha (e.g. 0.1) gives
  each client few classes; large alpha (e.g. 100) approaches an IID split.

  Clients left empty are repaired, one example at a time, with an example drawn
  at random from the currently largest client, so the skew changes as little
  as possible.

  Raises:
    UsageError: alpha not a finite number in [MIN_ALPHA, MAX_ALPHA], num_clients
      < 1 or larger than the number of examples, a bad seed, or unusable labels.
  """
  groups = partition_groups(labels)
  try:
    alpha = float(alpha)
  except (TypeError, ValueError):
    raise UsageError(f"Dirichlet alpha must be a number, got {alpha!r}: pass e.g. "
                     "--dirichlet_alpha=0.5") from None
  if not math.isfinite(alpha) or alpha <= 0:
    raise UsageError(f"Dirichlet alpha must be a positive finite number, got {alpha}: pass "
                     "e.g. --dirichlet_alpha=0.5 (smaller = more label skew), or use the "
                     "IID split")
  if alpha < MIN_ALPHA:
    raise UsageError(f"Dirichlet alpha {alpha:g} is below the smallest supported value "
                     f"{MIN_ALPHA:g} (NumPy's sampler stalls near 0): pass "
                     f"--dirichlet_alpha={MIN_ALPHA:g} or more; at {MIN_ALPHA:g} each class "
                     "already goes to about one client")
  if alpha > MAX_ALPHA:
    raise UsageError(f"Dirichlet alpha {alpha:g} is above the largest supported value "
                     f"{MAX_ALPHA:g}: pass a smaller --dirichlet_alpha, or use the IID "
                     "split, which large alpha only approximates")
  _check_counts(len(groups), num_clients)
  seed = guards.check_seed(seed)
  unique_groups = np.unique(groups)
  if len(unique_groups) * num_clients > MAX_DIRICHLET_DRAWS:
    raise UsageError(f"labels have {len(unique_groups)} distinct classes, too many for a "
                     f"Dirichlet split over {num_clients} clients: pass class indices (not "
                     "ids), fewer --num_clients, or use the IID split")
  rng = np.random.default_rng(seed)
  shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for group in unique_groups:
    members = rng.permutation(np.flatnonzero(groups == group))
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    if not (np.isfinite(proportions).all() and abs(proportions.sum() - 1.0) < 1e-6):
      # Never seen within [MIN_ALPHA, MAX_ALPHA]; a wrong split must not pass silently.
      raise UsageError(f"the Dirichlet sampler returned unusable proportions for alpha "
                       f"{alpha:g}: pass a --dirichlet_alpha between 0.01 and 100")
    cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
    for client, part in enumerate(np.split(members, cuts)):
      if part.size:
        shares[client].append(part)
  parts = [np.concatenate(s) if s else np.zeros(0, np.int64) for s in shares]
  _fill_empty_clients(parts, rng)
  return [np.sort(p).astype(np.int64) for p in parts]


def _fill_empty_clients(parts: list[np.ndarray], rng: np.random.Generator) -> None:
  """Moves one random example from the largest client into each empty one, in place.

  One pass, one move per empty client (no retry loop): it ends because
  num_clients <= num_examples guarantees a donor with >= 2 examples.
  """
  sizes = np.array([p.size for p in parts])
  for client in np.flatnonzero(sizes == 0):
    donor = int(np.argmax(sizes))  # Has >= 2 examples while any client is empty.
    pick = int(rng.integers(parts[donor].size))
    parts[client] = parts[donor][pick:pick + 1]
    parts[donor] = np.delete(parts[donor], pick)
    sizes[client], sizes[donor] = 1, sizes[donor] - 1


def client_sizes(partitions: Sequence[np.ndarray]) -> np.ndarray:
  """Number of examples per client."""
  return np.array([len(p) for p in partitions], dtype=np.int64)
