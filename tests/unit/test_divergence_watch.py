"""The divergence warning fires on a constructed exploding run, once per kind, and not before."""

import math

from tff_dpmed.program.loop import DivergenceWatch


def test_exploding_run_warns_once_per_kind():
  watch = DivergenceWatch()
  rows = [{"round": r, "val_loss": loss, "clip_norm": clip} for r, loss, clip in [
      (1, 0.69, 0.1), (2, 0.5, 0.09), (3, 0.55, 0.12), (4, 1.4, 0.3), (5, 1.6, 0.95),
      (6, 5.4, 3.5), (7, 528.0, 12.0)]]
  out = [(row["round"], w) for row in rows for w in watch.check(row)]
  # 1.6 > 3 x 0.5 and 0.95 > 10 x 0.09 first at round 5; rounds 6 and 7 do not repeat it.
  assert [r for r, _ in out] == [5, 5], out
  assert "val loss 1.6 is over 3x its lowest so far (0.5)" in out[0][1]
  assert "clip norm" in out[1][1] and "--server_learning_rate" in out[1][1]


def test_steady_or_improving_runs_do_not_warn():
  watch = DivergenceWatch()
  for r in range(1, 60):
    row = {"round": r, "val_loss": 0.7 / math.sqrt(r) * 1.5 if r % 7 == 0 else 0.7 / math.sqrt(r),
           "clip_norm": 0.1 * (1 + 0.02 * r)}
    assert watch.check(row) == []
  assert DivergenceWatch().check({"round": 1}) == []  # Rounds without evaluation.


def test_non_finite_loss_warns():
  watch = DivergenceWatch()
  assert watch.check({"round": 1, "val_loss": 0.7})  == []
  assert "not finite" in watch.check({"round": 2, "val_loss": float("inf")})[0]
