"""Privacy calculator: epsilon for a planned run, or the noise for a target epsilon.

  python -m tff_dpmed.privacy --num_clients=3383 --clients_per_round=120 \
      --rounds=100 --noise_multiplier=1.2
  python -m tff_dpmed.privacy --num_clients=3383 --clients_per_round=120 \
      --rounds=100 --target_epsilon=2

Prints how the number was obtained, then, as the last line, one JSON object
(epsilon, delta, noise_multiplier, accountant, sampling, ...). The JSON is
strict: an unbounded epsilon is null, with `epsilon_note` saying why.
"""

import json
import math
import os

from absl import flags

from tff_dpmed import cli
from tff_dpmed import files
from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import budget
from tff_dpmed.privacy import calibration
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.spec import Accountant, ClipMode, DPMode, DPSpec, Sampling, choices

_DP_MODE = flags.DEFINE_enum(
    "dp_mode", "central", choices(DPMode),
    "central: the server noises the sum of clipped updates; local: each client "
    "noises its own update; example: DP-SGD inside each client (per-example "
    "privacy); none: no privacy.")
_CLIENT_EXAMPLES = flags.DEFINE_string(
    "client_examples", None,
    "--dp_mode=example: examples per client, one number for all clients or a "
    "comma-separated list (one per client). The smallest client is the worst off.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "--dp_mode=example: the expected local batch B (sampling rate B / n_k).")
_LOCAL_BATCHING = flags.DEFINE_enum(
    "local_batching", "fixed_size", ("fixed_size", "fixed_rate"),
    "--dp_mode=example: fixed_size (rate B / n_k) or fixed_rate (one rate B K / sum n_k).")
_LOCAL_EPOCHS = flags.DEFINE_integer(
    "local_epochs", 1, "--dp_mode=example: local epochs per round (ceil(E n_k / B) steps).")
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
    "sampling", "poisson", choices(Sampling),
    "poisson: each client joins with q = clients_per_round / num_clients; fixed: "
    "uniform cohorts of exactly clients_per_round; all: every client every round.")
_ACCOUNTANT = flags.DEFINE_enum(
    "accountant", "auto", choices(Accountant),
    "rdp, pld, or auto (PLD when it supports the event, else RDP).")
_CLIP_MODE = flags.DEFINE_enum(
    "clip_mode", "adaptive", choices(ClipMode),
    "As the trainer: adaptive (TFF gaussian_adaptive, central only) or fixed.")
_CLIPPED_COUNT_STDDEV = flags.DEFINE_float(
    "clipped_count_stddev", None,
    "Adaptive clipping: stddev of the clipped-count noise; default "
    "max(0.05 * clients_per_round, noise_multiplier), as the trainer.")


_BUDGET_LEDGER = flags.DEFINE_string(
    "budget_ledger", None,
    "Print the total epsilon of every run recorded in this budget ledger (written by "
    "`tff_dpmed.train --budget_ledger=PATH`) instead of planning a run.")


def _print_budget(path: str) -> None:
  ledger = budget.BudgetLedger(path)
  if not os.path.exists(path):
    raise UsageError(f"--budget_ledger={path} does not exist: pass the file that "
                     "`tff_dpmed.train --budget_ledger` wrote")
  entries = ledger.entries()
  for entry_id, entry in sorted(entries.items()):
    spec = entry["spec"]
    print(f"{entry['run_dir']}: {spec['dp_mode']} DP, z={spec['noise_multiplier']}, "
          f"{entry['compositions']} accounting steps, delta={spec['delta']:g}")
  total = ledger.total(_DELTA.value)
  print(f"total: epsilon {total.epsilon:.6g} at delta={total.delta:g} over {total.entries} "
        f"run(s), {total.method}; privacy unit: one client")
  print(files.dumps({"epsilon": total.epsilon, "delta": total.delta, "runs": total.entries,
                     "accounting_steps": total.compositions, "method": total.method,
                     "privacy_unit": "client"}))


def _example_fields(mode: DPMode, num_clients: int) -> dict:
  """DP-SGD's batch, epochs and client sizes, only for --dp_mode=example."""
  given = [f"--{f.name}" for f in (_CLIENT_EXAMPLES, _BATCH_SIZE) if f.value is not None]
  if mode is not DPMode.EXAMPLE:
    if given:
      raise UsageError(f"{', '.join(given)} only apply to --dp_mode=example: drop them")
    return {}
  text = _required(_CLIENT_EXAMPLES, "470")
  try:
    sizes = [int(v) for v in text.split(",")]
  except ValueError:
    raise UsageError(f"--client_examples={text} is not a number or a comma-separated list "
                     "of numbers: e.g. 470 or 470,471,470") from None
  if len(sizes) == 1:
    sizes = sizes * num_clients
  if len(sizes) != num_clients:
    raise UsageError(f"--client_examples lists {len(sizes)} clients but --num_clients="
                     f"{num_clients}: give one number per client, or one for all")
  # The clip mode is irrelevant to the accounting here; DP-SGD clips fixed.
  return dict(batch_size=_required(_BATCH_SIZE, "64"), local_epochs=_LOCAL_EPOCHS.value,
              client_sizes=tuple(sizes), clip_mode="fixed",
              local_batching=_LOCAL_BATCHING.value)


def _required(flag, example: str):
  if flag.value is None:
    raise UsageError(f"--{flag.name} is required: pass e.g. --{flag.name}={example}")
  return flag.value


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}: pass everything as --flags")
  if _BUDGET_LEDGER.value is not None:
    _print_budget(_BUDGET_LEDGER.value)
    return
  num_clients = _required(_NUM_CLIENTS, "3383")
  rounds = accounting.check_rounds(_required(_ROUNDS, "100"))
  z, target = _NOISE_MULTIPLIER.value, _TARGET_EPSILON.value
  mode = DPMode(_DP_MODE.value)
  if mode is DPMode.NONE and (z is not None or target is not None):
    raise UsageError("--dp_mode=none adds no noise: drop --noise_multiplier and "
                     "--target_epsilon, or use --dp_mode=central or --dp_mode=local")
  if z is not None and target is not None:
    raise UsageError("--noise_multiplier and --target_epsilon are mutually exclusive: "
                     "pass one (target_epsilon finds the noise multiplier)")
  if mode is not DPMode.NONE and z is None and target is None:
    raise UsageError("pass --noise_multiplier (to get epsilon) or --target_epsilon "
                     "(to get the noise multiplier)")
  if target is not None and rounds < 1:
    raise UsageError(f"--rounds={rounds}: calibrating noise needs at least 1 round")

  sampling = Sampling(_SAMPLING.value)
  cohort = _CLIENTS_PER_ROUND.value
  # The cohort size only changes epsilon where sampling amplifies.
  cohort_used = mode is DPMode.CENTRAL and sampling is not Sampling.ALL
  if cohort is None:
    if cohort_used:
      _required(_CLIENTS_PER_ROUND, "120")
    cohort = num_clients
  spec = DPSpec(**{"mode": mode, "noise_multiplier": z, "num_clients": num_clients,
                   "clients_per_round": cohort, "sampling": sampling, "delta": _DELTA.value,
                   "accountant": _ACCOUNTANT.value, "clip_mode": _CLIP_MODE.value,
                   "clipped_count_stddev": _CLIPPED_COUNT_STDDEV.value,
                   **_example_fields(mode, num_clients)})
  accounting.check_accountant(spec)
  if target is not None:
    spec = calibration.calibrate(spec, rounds, target)
  z = spec.noise_multiplier
  mechanism = mechanisms.for_spec(spec)
  epsilon = accounting.epsilon_for_rounds(spec, rounds)
  private = mechanism.states_guarantee
  delta = spec.delta

  for line in accounting.explain(spec):
    print(line)
  if _DELTA.value is not None:
    print(f"delta: {delta:g} (from --delta)")
  else:
    units = (f"{sum(spec.client_sizes)} examples" if mode is DPMode.EXAMPLE
             else f"{num_clients} clients")
    print(f"delta: {delta:g} (default for {units}: min(1e-5, 10^-(ceil(log10 N) + 1)), "
          "well below 1/N so no unit's data may leak outright)")
  if delta >= 1 / num_clients:
    print(f"note: delta={delta:g} >= 1/num_clients = {1 / num_clients:.3g}: such a delta "
          "allows publishing a whole client's data; use a smaller --delta")
  if not cohort_used and _CLIENTS_PER_ROUND.value is not None and private:
    print("note: --clients_per_round does not change epsilon here "
          f"({'local DP' if mode is DPMode.LOCAL else 'example-level DP' if mode is DPMode.EXAMPLE else 'sampling=all'})")
  if mechanism.tracks_participation():
    print(f"local DP worst case: a client in all {rounds} rounds, "
          f"{rounds} x Gaussian({z / 2:g}); never less than the true worst client")
  if target is not None:
    print(f"noise_multiplier: {z:.6g} (smallest z with epsilon <= {target:g} after "
          f"{rounds} rounds)")
  print(f"epsilon: {epsilon:.6g} at delta={delta:g} after {rounds} rounds"
        + (", i.e. no privacy" if math.isinf(epsilon) else ""))

  result = {
      # Strict JSON: no Infinity; an unbounded epsilon is null with the reason.
      "epsilon": epsilon if math.isfinite(epsilon) else None,
      "delta": delta,
      "noise_multiplier": z,
      "accountant": accounting.resolve_accountant(spec) if private else None,
      "sampling": sampling.value,
      "dp_mode": mode.value,
      "rounds": rounds,
      "num_clients": num_clients,
      "clients_per_round": cohort,
      "privacy_unit": mechanism.privacy_unit,
      "neighboring_relation": mechanism.neighboring_relation.name.lower() if private else None,
      "clip_mode": "adaptive" if spec.adaptive else "fixed",
      "target_epsilon": target,
  }
  if not math.isfinite(epsilon):
    result["epsilon_note"] = "unbounded: no noise is added, so nothing is private"
  if spec.adaptive:
    z_v, s = mechanism.noise_split()
    result.update(value_noise_multiplier=z_v, clipped_count_stddev=s)
  if mechanism.tracks_participation():
    result["worst_case_participations"] = rounds
  if mode is DPMode.EXAMPLE:
    smallest = min(spec.client_sizes)
    result.update(batch_size=spec.batch_size, local_epochs=spec.local_epochs,
                  smallest_client=smallest, steps_per_round=spec.local_steps(smallest),
                  sampling_rate=spec.sampling_rate(smallest),
                  local_batching=spec.local_batching.value)
  print(json.dumps(result, allow_nan=False))


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
