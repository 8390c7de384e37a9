"""Noise calibration: the smallest noise multiplier that meets an epsilon target.

Kept free of TensorFlow imports so the privacy calculator starts quickly.
"""

import dataclasses
import math
import numbers

import dp_accounting

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.spec import DPMode, DPSpec

# Search range for z. Above 1e4 the updates are pure noise for any model.
MAX_NOISE_MULTIPLIER = 1e4
# Below this, "any noise meets the target": the target or delta is vacuous.
MIN_NOISE_MULTIPLIER = 1e-3
# Calibrated epsilon must land in [(1 - TOLERANCE) * target, target].
TOLERANCE = 0.02
# Brent's method tolerance on z, relative to the bracket's lower end; 1e-4 in
# z moves epsilon by ~1e-4 relative, far inside TOLERANCE.
_RELATIVE_Z_TOL = 1e-4


class TargetTooLoose(UsageError):
  """The target is met with next to no noise: it (or delta) does not mean anything."""


def calibrate(spec: DPSpec, rounds: int, target_epsilon: float) -> DPSpec:
  """`spec` with the noise multiplier `calibrate_noise_multiplier` finds."""
  return spec.with_noise(calibrate_noise_multiplier(spec, rounds, target_epsilon))


def calibrate_noise_multiplier(setting: DPSpec, rounds: int, target_epsilon: float) -> float:
  """The smallest z whose epsilon after `rounds` rounds is at most the target.

  Everything but `setting.noise_multiplier` (ignored) is used as given:
  sampling, delta, accountant, adaptive-clipping split. Local DP assumes the
  worst case, a client in every round. The result's epsilon, as
  `accounting.epsilon_for_rounds` reports it, is in
  [(1 - TOLERANCE) * target, target].

  Args:
    setting: The run's privacy setting; its noise_multiplier is replaced.
    rounds: The number of training rounds (>= 1).
    target_epsilon: The epsilon to meet, > 0.

  Returns:
    The noise multiplier z.

  Raises:
    UsageError: For bad input, or a target no z <= 1e4 can meet.
  """
  target = _target(target_epsilon)
  rounds = _positive_rounds(rounds)
  accounting.check_accountant(setting)
  if setting.mode is DPMode.NONE:
    raise UsageError("--dp_mode=none adds no noise, so there is nothing to calibrate: "
                     "drop --target_epsilon or use --dp_mode=central or --dp_mode=local")
  if setting.mode is DPMode.EXAMPLE and setting.noise_seed is not None:
    raise UsageError("--seed makes DP-SGD's batches and noise predictable, so no noise meets "
                     "an epsilon target (epsilon = inf): drop --seed (debugging only)")
  z_max = MAX_NOISE_MULTIPLIER
  fixed_s = setting.adaptive and setting.clipped_count_stddev is not None
  if fixed_s:
    # A user-set clipped-count stddev s only allows z < 2 s (TFF raises otherwise).
    z_max = min(z_max, 2 * float(setting.clipped_count_stddev) * (1 - 1e-9))
  with_z = setting.with_noise
  kind = accounting.resolve_accountant(with_z(1.0 if not fixed_s else z_max / 2))
  epsilon = lambda z: accounting.epsilon_for_rounds(with_z(z), rounds)

  eps_at_max = epsilon(z_max)
  if eps_at_max > target:
    limit = (f"the largest z allowed by --clipped_count_stddev={setting.clipped_count_stddev:g}"
             if fixed_s and z_max < MAX_NOISE_MULTIPLIER else "the largest z searched")
    raise UsageError(
        f"target epsilon {target:g} is not reachable: even noise_multiplier={z_max:g} "
        f"({limit}) gives epsilon {eps_at_max:.4g} after {rounds} rounds at "
        f"delta={setting.delta:g}; raise --target_epsilon, lower --rounds"
        + (" or raise --clipped_count_stddev" if fixed_s else ""))

  # RDP is cheap everywhere; PLD (slow for tiny z) starts from the RDP answer.
  guess = 1.0
  if kind == "pld":
    try:
      guess = calibrate_noise_multiplier(
          dataclasses.replace(setting, accountant="rdp"), rounds, target)
    except TargetTooLoose:
      raise  # PLD is tighter than RDP: met at the smallest z by RDP, met by PLD too.
    except UsageError:
      guess = z_max  # RDP is looser: PLD may still reach a target RDP cannot.
  lo, hi = _bracket(epsilon, target, guess, z_max)

  state = {}

  def make_event(z: float) -> dp_accounting.DpEvent:
    state["setting"] = with_z(z)
    return mechanisms.for_spec(state["setting"]).composed_event(
        rounds, single_gaussian=kind == "pld")

  def make_fresh_accountant() -> dp_accounting.PrivacyAccountant:
    # dp_accounting calls make_event(z) right before this, so the accountant
    # (PLD grid) is the one `epsilon_for_rounds` would use for that z.
    return accounting.make_accountant(state["setting"], rounds, kind)

  if setting.mode is DPMode.EXAMPLE:
    # Epsilon is the worst of several client sizes' compositions, which is no
    # single DpEvent for dp_accounting's search: bisect on it directly.
    z = _bisect(epsilon, target, lo, hi, _RELATIVE_Z_TOL * lo)
  else:
    z = float(dp_accounting.calibrate_dp_mechanism(
        make_fresh_accountant, make_event, target, setting.delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
        tol=_RELATIVE_Z_TOL * lo))
  achieved = epsilon(z)
  for _ in range(3):
    if achieved <= target:
      break
    # dp_accounting evaluated a fresh accountant; ours may differ in the last
    # bits (a cached PLD): step up by the tolerance rather than round down.
    z += _RELATIVE_Z_TOL * lo
    achieved = epsilon(z)
  if not (1 - TOLERANCE) * target <= achieved <= target:
    raise RuntimeError(
        f"calibration found noise_multiplier={z:.6g} with epsilon {achieved:.6g}, "
        f"outside [{(1 - TOLERANCE) * target:.6g}, {target:.6g}]")
  return z


def _bisect(epsilon, target: float, lo: float, hi: float, tol: float) -> float:
  """The hi end of [lo, hi], narrowed to `tol`, with epsilon(hi) <= target < epsilon(lo)."""
  while hi - lo > tol:
    mid = (lo + hi) / 2
    if epsilon(mid) <= target:
      hi = mid
    else:
      lo = mid
  return hi


def _bracket(epsilon, target: float, guess: float, z_max: float):
  """(lo, hi) with epsilon(lo) > target >= epsilon(hi), around `guess`."""
  guess = min(max(guess, MIN_NOISE_MULTIPLIER), z_max)
  if epsilon(guess) <= target:
    hi = guess
    lo = guess / 1.25
    while epsilon(lo) <= target:
      if lo <= MIN_NOISE_MULTIPLIER:
        raise TargetTooLoose(
            f"target epsilon {target:g} is met even with noise_multiplier="
            f"{MIN_NOISE_MULTIPLIER:g}: the target (or --delta) is too loose to mean "
            "anything; lower --target_epsilon or --delta, or pass --noise_multiplier")
      hi, lo = lo, max(lo / 2, MIN_NOISE_MULTIPLIER)
    return lo, hi
  lo, hi = guess, min(guess * 2, z_max)
  while epsilon(hi) > target:
    lo, hi = hi, min(hi * 2, z_max)
  return lo, hi


def _target(target_epsilon) -> float:
  if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, numbers.Real):
    raise UsageError(f"--target_epsilon={target_epsilon!r} is not a number: pass e.g. 8")
  target = float(target_epsilon)
  if not (target > 0 and math.isfinite(target)):
    raise UsageError(
        f"--target_epsilon={target:g} must be a positive finite number: pass e.g. 8")
  return target


def _positive_rounds(rounds) -> int:
  if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral):
    raise UsageError(f"--rounds={rounds!r} is not an integer: pass a whole number >= 1")
  if rounds < 1:
    raise UsageError(f"--rounds={rounds} must be at least 1 to calibrate noise for it")
  return accounting.check_rounds(int(rounds))
