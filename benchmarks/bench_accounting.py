"""Times the privacy calculator's computations at 10,000 rounds.

  python -m benchmarks.bench_accounting [--repeats=3] [--rounds=10000]

Each case starts from empty caches (a fresh calculator process would) and the
median of the repetitions is reported as a markdown table. Target: epsilon at
10,000 rounds in under 2 s with either accountant.
"""

import dataclasses
import statistics
import time
from typing import Callable

from absl import app
from absl import flags

from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import calibration
from tff_dpmed.privacy.ledger import PrivacyLedger
from tff_dpmed.privacy.spec import DPSpec

_REPEATS = flags.DEFINE_integer("repeats", 3, "Repetitions per case (median reported).")
_ROUNDS = flags.DEFINE_integer("rounds", 10_000, "Training rounds to account for.")
EPSILON_TARGET_S = 2.0

BASE = DPSpec(mode="central", noise_multiplier=1.2, num_clients=3383, clients_per_round=120,
              sampling="poisson", delta=1e-5, accountant="rdp", clip_mode="adaptive")


def _cases(rounds: int) -> list[tuple[str, Callable[[], float]]]:
  def eps(**overrides):
    s = dataclasses.replace(BASE, **overrides)
    return lambda: accounting.epsilon_for_rounds(s, rounds)

  def calib(target, **overrides):
    s = dataclasses.replace(BASE, **overrides)
    return lambda: calibration.calibrate_noise_multiplier(s, rounds, target)

  def ledger_rounds(n, **overrides):
    """n rounds of record_round + epsilon(), as the training loop does."""
    s = dataclasses.replace(BASE, **overrides)

    def go():
      ledger = PrivacyLedger(s)
      for _ in range(n):
        ledger.record_round(range(s.clients_per_round))
        ledger.epsilon()
      return ledger.epsilon()
    return go

  return [
      (f"epsilon, RDP, poisson, {rounds} rounds", eps()),
      (f"epsilon, PLD, poisson, {rounds} rounds", eps(accountant="pld")),
      (f"epsilon, RDP, fixed (w/o replacement), {rounds} rounds", eps(sampling="fixed")),
      (f"epsilon, PLD, local DP z=8, {rounds} rounds",
       eps(mode="local", clip_mode="fixed", noise_multiplier=8.0, accountant="pld")),
      (f"calibrate z for epsilon=8, RDP, poisson, {rounds} rounds", calib(8.0)),
      (f"calibrate z for epsilon=8, PLD, poisson, {rounds} rounds", calib(8.0, accountant="pld")),
      (f"calibrate z for epsilon=8, RDP, fixed, {rounds} rounds", calib(8.0, sampling="fixed")),
      ("ledger: 1000 x (record_round + epsilon), RDP", ledger_rounds(1000)),
      ("ledger: 10 x (record_round + epsilon), PLD", ledger_rounds(10, accountant="pld")),
  ]


def _time(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
  times, value = [], None
  for _ in range(repeats):
    accounting.clear_caches()
    start = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), value


def main(argv):
  del argv
  rounds, repeats = _ROUNDS.value, _REPEATS.value
  print(f"| case | median of {repeats} (s) | result |")
  print("|---|---:|---:|")
  slow = []
  for name, fn in _cases(rounds):
    seconds, value = _time(fn, repeats)
    print(f"| {name} | {seconds:.3f} | {value:.4g} |", flush=True)
    if name.startswith("epsilon") and seconds > EPSILON_TARGET_S:
      slow.append(name)
  if slow:
    print(f"\nover the {EPSILON_TARGET_S:g} s target: {', '.join(slow)}")


if __name__ == "__main__":
  app.run(main)
