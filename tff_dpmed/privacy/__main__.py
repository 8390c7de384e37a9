"""Privacy calculator: epsilon for a planned run, or the noise for a target epsilon.

  python -m tff_dpmed.privacy --num_clients=3383 --clients_per_round=120 \
      --rounds=100 --noise_multiplier=1.2
  python -m tff_dpmed.privacy --num_clients=3383 --clients_per_round=120 \
      --rounds=100 --target_epsilon=2

Prints how the number was obtained, then, as the last line, one JSON object
(epsilon, delta, noise_multiplier, accountant, sampling, ...). An infinite
epsilon is written as Python's JSON `Infinity`.
"""

import dataclasses
import json
import math

from absl import flags

from tff_dpmed import cli
from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import calibration

_DP_MODE = flags.DEFINE_enum(
    "dp_mode", "central", accounting.DP_MODES,
    "central: the server noises the sum of clipped updates; local: each client "
    "noises its own update; none: no privacy.")
_NOISE_MULTIPLIER = flags.DEFINE_float(
    "noise_multiplier", None,
    "Noise stddev / clip norm (with adaptive clipping: TFF's total effective "
    "multiplier). Exactly one of this and --target_epsilon.")
_TARGET_EPSILON = flags.DEFINE_float(
    "target_epsilon", None,
    "Find the smallest --noise_multiplier whose epsilon after --rounds is at most this.")
_NUM_CLIENTS = flags.DEFINE_integer(
    "num_clients", None, "Number of clients (the privacy units). Required.")
_CLIENTS_PER_ROUND = flags.DEFINE_integer(
    "clients_per_round", None,
    "Expected cohort size. Required for central DP with poisson or fixed sampling.")
_ROUNDS = flags.DEFINE_integer("rounds", None, "Number of training rounds. Required.")
_DELTA = flags.DEFINE_float(
    "delta", None, "delta of (epsilon, delta); default min(1e-5, 10^-(ceil(log10 N) + 1)).")
_SAMPLING = flags.DEFINE_enum(
    "sampling", "poisson", accounting.SAMPLINGS,
    "poisson: each client joins with q = clients_per_round / num_clients; fixed: "
    "uniform cohorts of exactly clients_per_round; all: every client every round.")
_ACCOUNTANT = flags.DEFINE_enum(
    "accountant", "auto", accounting.ACCOUNTANTS,
    "rdp, pld, or auto (PLD when it supports the event, else RDP).")
_CLIP_MODE = flags.DEFINE_enum(
    "clip_mode", "adaptive", ("adaptive", "fixed"),
    "As the trainer: adaptive (TFF gaussian_adaptive, central only) or fixed.")
_CLIPPED_COUNT_STDDEV = flags.DEFINE_float(
    "clipped_count_stddev", None,
    "Adaptive clipping: stddev of the clipped-count noise; default "
    "max(0.05 * clients_per_round, noise_multiplier), as the trainer.")


def _required(flag, example: str):
  if flag.value is None:
    raise UsageError(f"--{flag.name} is required: pass e.g. --{flag.name}={example}")
  return flag.value


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}: pass everything as --flags")
  dp_mode = _DP_MODE.value
  num_clients = _required(_NUM_CLIENTS, "3383")
  rounds = _required(_ROUNDS, "100")
  if rounds < 0:
    raise UsageError(f"--rounds={rounds} is negative: pass a number of rounds >= 0")
  z, target = _NOISE_MULTIPLIER.value, _TARGET_EPSILON.value
  if dp_mode == "none":
    if z is not None or target is not None:
      raise UsageError("--dp_mode=none adds no noise: drop --noise_multiplier and "
                       "--target_epsilon, or use --dp_mode=central or --dp_mode=local")
    z = 0.0
  elif z is not None and target is not None:
    raise UsageError("--noise_multiplier and --target_epsilon are mutually exclusive: "
                     "pass one (target_epsilon finds the noise multiplier)")
  elif z is None and target is None:
    raise UsageError("pass --noise_multiplier (to get epsilon) or --target_epsilon "
                     "(to get the noise multiplier)")
  if target is not None and rounds < 1:
    raise UsageError(f"--rounds={rounds}: calibrating noise needs at least 1 round")

  sampling = _SAMPLING.value
  cohort = _CLIENTS_PER_ROUND.value
  cohort_used = dp_mode == "central" and sampling != "all"
  if cohort is None:
    if cohort_used:
      _required(_CLIENTS_PER_ROUND, "120")
    cohort = num_clients  # Does not affect epsilon here; see the output.
  delta = _DELTA.value
  delta_from_flag = delta is not None
  if delta is None:
    delta = accounting.default_delta(num_clients)
  adaptive = dp_mode == "central" and _CLIP_MODE.value == "adaptive"
  if dp_mode == "local" and _CLIP_MODE.value == "adaptive":
    adaptive = True  # So that validate() names the conflict instead of ignoring it.

  setting = accounting.PrivacySetting(
      dp_mode=dp_mode, noise_multiplier=0.0 if z is None else z,
      num_clients=num_clients, clients_per_round=cohort, sampling=sampling,
      delta=delta, accountant=_ACCOUNTANT.value, adaptive_clipping=adaptive,
      clipped_count_stddev=_CLIPPED_COUNT_STDDEV.value)
  if target is not None:
    z = calibration.calibrate_noise_multiplier(setting, rounds, target)
    setting = dataclasses.replace(setting, noise_multiplier=z)
  setting.validate()
  epsilon = accounting.epsilon_for_rounds(setting, rounds)

  for line in accounting.explain(setting):
    print(line)
  if delta_from_flag:
    print(f"delta: {delta:g} (from --delta)")
  else:
    print(f"delta: {delta:g} (default for {num_clients} clients: min(1e-5, "
          "10^-(ceil(log10 N) + 1)), well below 1/N so no client's data may leak outright)")
  if delta >= 1 / num_clients:
    print(f"note: delta={delta:g} >= 1/num_clients = {1 / num_clients:.3g}: such a delta "
          "allows publishing a whole client's data; use a smaller --delta")
  if not cohort_used and _CLIENTS_PER_ROUND.value is not None and dp_mode != "none":
    print("note: --clients_per_round does not change epsilon here "
          f"({'local DP' if dp_mode == 'local' else 'sampling=all'})")
  if dp_mode == "local":
    print(f"local DP worst case: a client in all {rounds} rounds, "
          f"{rounds} x Gaussian({z / 2:g}); never less than the true worst client")
  if target is not None:
    print(f"noise_multiplier: {z:.6g} (smallest z with epsilon <= {target:g} after "
          f"{rounds} rounds)")
  print(f"epsilon: {epsilon:.6g} at delta={delta:g} after {rounds} rounds"
        + (", i.e. no privacy" if math.isinf(epsilon) else ""))

  result = {
      "epsilon": epsilon,
      "delta": delta,
      "noise_multiplier": z,
      "accountant": accounting.resolve_accountant(setting) if dp_mode != "none" else None,
      "sampling": sampling,
      "dp_mode": dp_mode,
      "rounds": rounds,
      "num_clients": num_clients,
      "clients_per_round": cohort,
      "privacy_unit": accounting.PRIVACY_UNIT,
      "neighboring_relation": (accounting.neighboring_relation(setting).name.lower()
                               if dp_mode != "none" else None),
      "clip_mode": "adaptive" if adaptive else "fixed",
      "target_epsilon": target,
  }
  if adaptive and dp_mode == "central":
    z_v, s = accounting.adaptive_noise_split(setting)
    result.update(value_noise_multiplier=z_v, clipped_count_stddev=s)
  if dp_mode == "local":
    result["worst_case_participations"] = rounds
  print(json.dumps(result))


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
