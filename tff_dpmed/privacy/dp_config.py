"""What the user asked for, privacy-wise: DP placement, clipping and noise.

`DPConfig` is plain data built from the trainer's flags; `validate()` turns
every bad combination into a one-line `UsageError` before anything is built,
so a run never starts with settings that would be silently ignored.
"""

import dataclasses
import math
import numbers
from typing import Optional

from tff_dpmed.errors import UsageError

MODES = ("central", "local", "none")
CLIP_MODES = ("adaptive", "fixed")


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """Differential privacy settings for the model-update aggregation.

  Attributes:
    mode: Where noise is added. 'central': the server clips each client's
      update and adds Gaussian noise to the sum (trusted aggregator). 'local':
      each client clips and noises its own update before it leaves the client
      (untrusted aggregator). 'none': no clipping, no noise.
    noise_multiplier: z, the Gaussian noise stddev in units of the clip norm.
      For adaptive central DP it is the *total* effective multiplier, which
      also pays for the private estimate of the clipped-client count.
    clip_mode: 'adaptive' (the clip norm tracks a quantile of the client update
      norms, central only) or 'fixed'.
    clip: The fixed clip norm C, or the initial clip norm for adaptive.
    target_unclipped_quantile: Adaptive only: the fraction of clients whose
      updates should end up unclipped.
    adaptive_clip_learning_rate: Adaptive only: geometric learning rate of the
      clip norm (it changes by at most a factor exp(rate) per round).
    clipped_count_stddev: Adaptive only: stddev of the noise on the count of
      clipped clients; None chooses it automatically (see
      `calibration.choose_clipped_count_stddev`).
    expected_clients_per_round: Central only: the denominator of the noised
      mean (TFF's DP mean divides by this constant, not the actual count).
    seed: Seeds the local-DP client noise (central DP noise comes from TFF and
      is never seeded). A seeded local-DP run is reproducible, and therefore
      *not private* (the noise is predictable): debugging only. None draws
      non-deterministic noise.
  """
  mode: str
  noise_multiplier: float = 0.0
  clip_mode: str = "adaptive"
  clip: float = 0.1
  target_unclipped_quantile: float = 0.5
  adaptive_clip_learning_rate: float = 0.2
  clipped_count_stddev: Optional[float] = None
  expected_clients_per_round: float = 1.0
  seed: Optional[int] = None

  def validate(self) -> None:
    """Raises `UsageError` naming the first bad setting and how to fix it."""
    if self.mode not in MODES:
      raise UsageError(f"unknown --dp_mode={self.mode!r}: use one of {', '.join(MODES)}")
    if self.clip_mode not in CLIP_MODES:
      raise UsageError(
          f"unknown --clip_mode={self.clip_mode!r}: use one of {', '.join(CLIP_MODES)}")
    z = _finite_number(self.noise_multiplier, "noise_multiplier")
    if z < 0:
      raise UsageError(f"--noise_multiplier={z} is negative: use a value >= 0")
    if self.mode == "none":
      if z > 0:
        # Noise the user asked for would otherwise be silently dropped.
        raise UsageError(
            f"--noise_multiplier={z} has no effect with --dp_mode=none: "
            "set --noise_multiplier=0 or use --dp_mode=central or --dp_mode=local")
      return
    clip = _finite_number(self.clip, "clip")
    if clip <= 0:
      raise UsageError(f"--clip={clip} must be positive: use a clip norm > 0, e.g. 0.1")
    n = _finite_number(self.expected_clients_per_round, "clients_per_round")
    if n <= 0:
      raise UsageError(
          f"expected clients per round = {n} must be positive: "
          "use --clients_per_round >= 1")
    if self.seed is not None and (
        isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        or not -2**63 <= self.seed < 2**63):
      raise UsageError(f"--seed={self.seed!r} is not a 64-bit integer: pass one or omit --seed")
    if self.mode == "local" and self.clip_mode == "adaptive":
      raise UsageError(
          "adaptive clipping is not supported with --dp_mode=local: its "
          "clipped-count query would need its own local randomiser and "
          "accounting; use --clip_mode=fixed")
    if self.clip_mode == "fixed":
      if self.clipped_count_stddev is not None:
        raise UsageError(
            "--clipped_count_stddev only applies to --clip_mode=adaptive: "
            "omit it or use --clip_mode=adaptive")
      return
    q = _finite_number(self.target_unclipped_quantile, "target_unclipped_quantile")
    if not 0 < q < 1:
      raise UsageError(
          f"--target_unclipped_quantile={q} is outside (0, 1): use e.g. 0.5")
    lr = _finite_number(self.adaptive_clip_learning_rate, "adaptive_clip_learning_rate")
    if lr < 0:
      raise UsageError(
          f"--adaptive_clip_learning_rate={lr} is negative: use a value >= 0, e.g. 0.2")
    if self.clipped_count_stddev is not None:
      s = _finite_number(self.clipped_count_stddev, "clipped_count_stddev")
      if s < 0:
        raise UsageError(
            f"--clipped_count_stddev={s} is negative: use a value >= 0 or omit it")
      check_clipped_count_stddev(z, n, s)


def check_clipped_count_stddev(noise_multiplier: float, clients_per_round: float,
                               clipped_count_stddev: float) -> None:
  """Raises `UsageError` if the clipped-count noise cannot pay its privacy share.

  Adaptive clipping releases two noised sums per round: the updates (noise
  multiplier z_v) and the clipped-client count (stddev s, sensitivity 1/2).
  Their combined privacy cost equals a single Gaussian mechanism with
  z^-2 = z_v^-2 + (2s)^-2, so z_v is finite only when z < 2s.
  """
  z, s = noise_multiplier, clipped_count_stddev
  if z > 0 and z >= 2 * s:
    raise UsageError(
        f"--clipped_count_stddev={s:g} is too small for --noise_multiplier={z:g}: "
        "adaptive clipping needs noise_multiplier < 2 * clipped_count_stddev "
        "because the noised clipped-client count spends part of the privacy budget; "
        f"raise --clipped_count_stddev above {z / 2:g}, or omit it to use "
        "max(0.05 * clients_per_round, noise_multiplier) (TFF's 0.05 * clients_per_round "
        f"alone needs --clients_per_round > {math.floor(z / 0.1 + 1e-9):d}, "
        f"now {clients_per_round:g})")


def _finite_number(value, name: str) -> float:
  """`value` as a float; UsageError if it is not a finite real number."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise UsageError(f"--{name}={value!r} is not a number: pass a finite number")
  value = float(value)
  if not math.isfinite(value):
    raise UsageError(f"--{name}={value} is not finite: pass a finite number")
  return value
