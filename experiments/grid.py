"""The privacy-utility study's grid: its points, what they share, and each point's RunConfig.

A point is one training run: a DP mode, a seed and a noise level (a noise
multiplier z, or a target epsilon that `trainer.prepare` calibrates z to). The
non-private baseline has no noise level and runs once per seed. With canary
twins, every point has a twin: the same run with client-level canaries
(`--audit=canary`), which measures the empirical epsilon. The canaries join
the rounds as clients and move the model, so the utility columns come from
the run without them.
"""

import dataclasses
import math
import os
from typing import Optional, Sequence

from tff_dpmed.errors import UsageError
from tff_dpmed.program.config import RunConfig

MODES = ("none", "central", "local")
# Seeds go to NumPy's legacy seeding (tf.keras.utils.set_random_seed), which
# takes integers in [0, 2^32) only.
SEED_LIMIT = 2**32


@dataclasses.dataclass(frozen=True)
class GridPoint:
  """One run of the study."""
  mode: str
  seed: int
  noise_multiplier: Optional[float] = None  # None for mode "none" and with target_epsilon.
  target_epsilon: Optional[float] = None
  canaries: bool = False  # The canary twin of the point without them.

  @property
  def level(self) -> Optional[float]:
    """The grid value this point varies: z, or the target epsilon (None for no DP)."""
    return self.target_epsilon if self.target_epsilon is not None else self.noise_multiplier

  @property
  def level_label(self) -> str:
    if self.mode == "none":
      return "–"
    return f"ε*={self.target_epsilon:g}" if self.target_epsilon is not None else \
        f"z={self.noise_multiplier:g}"

  @property
  def name(self) -> str:
    return self._base_name + ("_canaries" if self.canaries else "")

  @property
  def _base_name(self) -> str:
    if self.mode == "none":
      return f"none_s{self.seed}"
    if self.target_epsilon is not None:
      return f"{self.mode}_eps{self.target_epsilon:g}_s{self.seed}"
    return f"{self.mode}_z{self.noise_multiplier:g}_s{self.seed}"

  def twin(self) -> "GridPoint":
    """The same run with canaries."""
    return dataclasses.replace(self, canaries=True)


def check_seeds(seeds: Sequence[int]) -> None:
  """One UsageError for an empty, repeated, negative or too large --seeds (issue 17)."""
  if not seeds:
    raise UsageError("--seeds is empty: give at least one seed, e.g. --seeds=0,1,2")
  bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
  if bad:
    raise UsageError(f"--seeds: {', '.join(map(str, bad))} outside [0, 2^32): seeds must be "
                     "whole numbers from 0 to 4294967295, e.g. --seeds=0,1,2")
  if len(set(seeds)) != len(seeds):
    raise UsageError(f"--seeds={','.join(map(str, seeds))} repeats a seed")


def make_grid(modes: Sequence[str], seeds: Sequence[int],
              noise_multipliers: Sequence[float] = (),
              target_epsilons: Sequence[float] = (), canary_twins: bool = False) -> list:
  """Every run: `none` once per seed, each DP mode once per z (or target epsilon) and
  seed; with `canary_twins`, then each of them again with canaries."""
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    raise UsageError(f"--modes: unknown {', '.join(unknown)}: use some of {', '.join(MODES)}")
  if bool(noise_multipliers) == bool(target_epsilons):
    if any(m != "none" for m in modes):
      raise UsageError("give exactly one of --noise_multipliers and --target_epsilons")
  check_seeds(seeds)
  for name, values in (("noise_multipliers", noise_multipliers),
                       ("target_epsilons", target_epsilons)):
    if any(not (math.isfinite(v) and v > 0) for v in values):
      raise UsageError(f"--{name} must all be finite numbers > 0")
    if len(set(values)) != len(values):
      raise UsageError(f"--{name} repeats a value")
  points = []
  for mode in [m for m in MODES if m in modes]:
    for seed in seeds:
      if mode == "none":
        points.append(GridPoint("none", seed))
        continue
      for z in noise_multipliers:
        points.append(GridPoint(mode, seed, noise_multiplier=float(z)))
      for eps in target_epsilons:
        points.append(GridPoint(mode, seed, target_epsilon=float(eps)))
  return points + ([p.twin() for p in points] if canary_twins else [])


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """What every run shares, and how DP modes clip."""
  base: dict            # Flat, flag-named RunConfig fields shared by every run.
  output_dir: str
  clip: float = 0.1     # The fixed clip norm of local DP (and of central DP if fixed).
  central_clip_mode: str = "adaptive"
  central_clip: float = 0.1  # Central DP: the initial (adaptive) or fixed clip norm.
  audit_max_examples: int = 2000
  audit_seed: int = 0
  audit_nonmembers: str = "test"
  keep_checkpoints: bool = False
  # True: RunConfig.seed = the point's seed (splits, init, client shuffling,
  # local-DP noise; and cohorts without DP). DP cohorts stay unseeded, as the
  # trainer samples them unless --insecure_reproducible_sampling, so epsilon
  # keeps its sampling amplification. False: seed=None, the seed only names a
  # replicate.
  seeded: bool = True

  @property
  def runs_dir(self) -> str:
    return os.path.join(self.output_dir, "runs")

  @property
  def budget_ledger(self) -> str:
    """Composes every DP run of the study: its whole privacy cost, tuning included."""
    return os.path.join(self.output_dir, "budget_ledger.json")

  def run_dir(self, point: GridPoint) -> str:
    return os.path.join(self.runs_dir, point.name)


def run_config(point: GridPoint, settings: StudySettings) -> RunConfig:
  """The RunConfig of one grid point (validated by its construction)."""
  flat = dict(settings.base)
  flat.update(dp_mode=point.mode, seed=point.seed if settings.seeded else None,
              output_dir=settings.runs_dir, experiment_name=point.name,
              noise_multiplier=point.noise_multiplier, target_epsilon=point.target_epsilon,
              restart=False, audit="canary" if point.canaries else "none",
              reproducible_sampling=False,
              # The non-private baseline is a reference, not a release of the study.
              budget_ledger=None if point.mode == "none" else settings.budget_ledger)
  if point.mode == "local":
    flat.update(clip_mode="fixed", clip=settings.clip)
  elif point.mode == "central":
    fixed = settings.central_clip_mode == "fixed"
    flat.update(clip_mode=settings.central_clip_mode,
                clip=settings.clip if fixed else settings.central_clip)
  return RunConfig.from_json(flat)
