"""The whole benchmark suite in one command; writes benchmarks/RESULTS.md.

  python -m benchmarks.run_all [--data_dir=...] [--repetitions=3] [--quick]
      [--only=round_time,first_round,scale,throughput,dp_sgd,keras_ratio,large_images]
      [--output=benchmarks/RESULTS.md]

  1. round time: tff_dpmed vs the plain-TF reference at 10 and 100 of 100
     clients per round (bench_round_time)
  2. first round: process start to end of round 1, by stage (bench_first_round)
  3. scale: 100 / 1,000 / 10,000 clients, 50 per round; round time and peak
     RSS with the TFF worker (bench_scale)
  4. throughput: examples/s per core, tff_dpmed vs Keras model.fit
     (bench_throughput; tff_dpmed's numbers come from step 1 at 100 clients)
  5. example-level DP-SGD: a federated round over 10 hospitals vs a central
     TF Privacy Keras epoch, scatter_linear and gap_cnn (bench_dp_sgd)
  6. against Keras fit: the ratio at 100 clients of ~47 images, 10 hospitals
     of ~470 and 500 one-image clients per round (bench_keras_ratio)
  7. large images: 224-px PneumoniaMNIST beside the worker, peak RSS and the
     ratio to Keras fit (bench_large_images)

About 3 minutes on a quiet 2-core machine with protobuf's upb backend (the
lock's 4.25.3), 10 with the pure-Python 3.20.3 (see the Levers section), plus
about 4 for step 5, 5 for step 6 and 3 for step 7;
--quick is a smoke run of a few minutes whose numbers mean nothing. The tables are printed and written, with the command, commit,
date and machine, to --output; raw results go next to it as JSON.
"""

import os
import time

from absl import app
from absl import flags
# Before absl parses flags; see bench_round_time.
import tensorflow as tf  # pylint: disable=unused-import

from benchmarks import bench_dp_sgd
from benchmarks import bench_first_round
from benchmarks import bench_keras_ratio
from benchmarks import bench_large_images
from benchmarks import bench_round_time
from benchmarks import bench_scale
from benchmarks import bench_throughput
from benchmarks import common_flags
from benchmarks import report

PIECES = ("round_time", "first_round", "scale", "throughput", "dp_sgd", "keras_ratio",
          "large_images")
_ONLY = flags.DEFINE_list("only", list(PIECES), f"Which pieces to run, of {', '.join(PIECES)}.")
DEFAULT_OUTPUT = os.path.join(report.REPO, "benchmarks", "RESULTS.md")
LEVERS_FILE = os.path.join(report.REPO, "benchmarks", "LEVERS.md")

ROUND_TIME_TARGET = 1.3


def _how(module) -> str:
  """A benchmark's docstring without its title and usage lines: what it measures, how."""
  return "\n\n".join(module.__doc__.strip().split("\n\n")[2:])


def _sizes(quick: bool, repetitions: int) -> dict:
  dp_sgd_models = bench_dp_sgd.parse_models(bench_dp_sgd.MODEL_CASES.value)
  if quick:
    return dict(reps=1, round_time_k=[5], round_time_rounds=2, warmup=1, first_round_reps=1,
                scale_clients=[100, 1000], scale_k=5, scale_rounds=1, fit_epochs=1,
                dp_sgd_models=dp_sgd_models[:1], keras_ratio_rounds=1, large_image_size=64)
  return dict(reps=repetitions, round_time_k=[10, 100], round_time_rounds=3, warmup=2,
              first_round_reps=repetitions, scale_clients=[100, 1000, 10000], scale_k=50,
              scale_rounds=3, fit_epochs=2, dp_sgd_models=dp_sgd_models,
              keras_ratio_rounds=bench_keras_ratio.ROUNDS_PER_REP, large_image_size=224)


def _verdicts(raw: dict) -> list:
  """The targets, stated from the numbers measured."""
  out = []
  for entry in raw.get("round_time", []):
    if entry["clients_per_round"] == 100:
      med = report.median_range(bench_round_time.ratios(entry))[0]
      cpu = report.median_range(bench_round_time.ratios(entry, "cpu_s"))[0]
      out.append(f"- Round-time ratio at 100 clients per round: {med:.2f} by wall time "
                 f"({cpu:.2f} by CPU time); target <= {ROUND_TIME_TARGET}: "
                 f"{'met' if med <= ROUND_TIME_TARGET else '**not met**'}.")
  if "keras_ratio" in raw:
    out += bench_keras_ratio.verdicts(raw["keras_ratio"])
  if "large_images" in raw:
    out += bench_large_images.verdicts(raw["large_images"])
  first = [bench_first_round.breakdown(r)["total"] for r in raw.get("first_round", [])
           if r["contender"] == "tff_dpmed"]
  if first:
    med = report.median_range(first)[0]
    target = bench_first_round.TARGET_S
    floor = report.median_range(bench_first_round.floor_seconds(raw["first_round"]))[0]
    out.append(f"- First round (process start to end of round 1): {med:.1f} s; target <= "
               f"{target:g} s: " + ("met." if med <= target else
                                    f"**missed** by {med - target:.1f} s (a fresh interpreter "
                                    f"takes {floor:.1f} s to `import tensorflow` alone)."))
  return out + bench_dp_sgd.verdicts(raw.get("dp_sgd", []))


def main(argv):
  del argv
  started = time.time()
  quick, only = common_flags.QUICK.value, set(_ONLY.value)
  unknown = only - set(PIECES)
  if unknown:
    raise app.UsageError(f"--only: unknown {', '.join(sorted(unknown))}; use {', '.join(PIECES)}")
  s = _sizes(quick, common_flags.REPETITIONS.value)
  data_dir = common_flags.DATA_DIR.value
  info = report.machine()
  raw, sections = {"machine": info, "quick": quick, "sizes": s}, []

  if "round_time" in only or "throughput" in only:
    ks = s["round_time_k"] if "round_time" in only else [max(s["round_time_k"])]
    raw["round_time"] = bench_round_time.run(data_dir, ks, s["round_time_rounds"], s["reps"],
                                             s["warmup"])
    if "round_time" in only:
      sections.append(("1. Round time: tff_dpmed vs plain TensorFlow",
                       _how(bench_round_time),
                       bench_round_time.markdown(raw["round_time"])))
  if "first_round" in only:
    raw["first_round"] = bench_first_round.run(data_dir, s["first_round_reps"])
    sections.append(("2. First-round latency", _how(bench_first_round),
                     bench_first_round.markdown(raw["first_round"])))
  if "scale" in only:
    raw["scale"] = bench_scale.run(data_dir, s["scale_clients"], s["scale_k"], s["reps"],
                                   s["scale_rounds"])
    sections.append(("3. Scale: total clients", _how(bench_scale),
                     bench_scale.markdown(raw["scale"])))
  if "throughput" in only:
    raw["keras_fit"] = bench_throughput.keras_fit(data_dir, s["reps"], s["fit_epochs"])
    entry = max(raw["round_time"], key=lambda e: e["clients_per_round"])
    sections.append(("4. Throughput: the default model", _how(bench_throughput),
                     bench_throughput.markdown(raw["keras_fit"], entry)))
  if "dp_sgd" in only:
    raw["dp_sgd"] = bench_dp_sgd.run(data_dir, s["dp_sgd_models"], s["reps"],
                                     bench_dp_sgd.OPTIMIZER_MODELS.value)
    sections.append(("5. Example-level DP-SGD: federated vs central", _how(bench_dp_sgd),
                     bench_dp_sgd.markdown(raw["dp_sgd"])))
  if "keras_ratio" in only:
    raw["keras_ratio"] = bench_keras_ratio.run(data_dir, s["reps"], s["keras_ratio_rounds"],
                                               quick=quick)
    sections.append(("6. Against Keras fit: three client sizes", _how(bench_keras_ratio),
                     bench_keras_ratio.markdown(raw["keras_ratio"])))
  if "large_images" in only:
    raw["large_images"] = bench_large_images.run(data_dir, s["large_image_size"], s["reps"],
                                                 s["keras_ratio_rounds"])
    sections.append((f"7. Large images: {s['large_image_size']}-px data beside the worker",
                     _how(bench_large_images), bench_large_images.render(raw["large_images"])))
  raw["seconds"] = time.time() - started

  title = "# Benchmark results" + (" (SMOKE RUN: --quick, the numbers mean nothing)" if quick else "")
  settings = ", ".join(f"{k}={v}" for k, v in s.items())
  parts = [title, "", f"Run time {raw['seconds'] / 60:.1f} min. Values are medians over "
           f"{s['reps']} repetition(s) with (min-max); see each section for what a repetition "
           f"is. Sizes: {settings}.", "", report.machine_table(info), ""]
  verdicts = _verdicts(raw)
  if verdicts:
    parts += ["## Targets", "", *verdicts, ""]
  for heading, how, body in sections:
    parts += [f"## {heading}", "", how.strip(), "", body, ""]
  if os.path.exists(LEVERS_FILE):
    with open(LEVERS_FILE) as f:
      parts += [f.read().strip(), ""]
  text = "\n".join(parts)
  print(text)
  report.write(common_flags.OUTPUT.value or DEFAULT_OUTPUT, text, raw)


if __name__ == "__main__":
  app.run(main)
