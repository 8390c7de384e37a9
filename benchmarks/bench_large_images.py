"""Large images: 224-px training data beside the worker, against Keras `fit` on the same images.

  python -m benchmarks.bench_large_images [--data_dir=...] [--large_image_size=224]
      [--repetitions=3] [--output=benchmarks/RESULTS_LARGE_IMAGES.md]

PneumoniaMNIST's 4,708 training images upsampled (bilinear) to
--large_image_size px, as no 224-px PneumoniaMNIST file is on this machine
(`--image_size=224` reads one where it exists), over 100 IID clients, 10 per
round, the trainer's default job otherwise (central DP, adaptive clipping,
the small CNN, which average-pools large inputs down to 32 px first). The
clients' data are in files the TFF worker reads (the trainer's local runs),
so the computation carries client ids only. One process (benchmarks.child;
the first two rounds untimed) gives the round time and the peak RSS of the
main process plus the worker; Keras `fit` runs one epoch over the same
upsampled images in this process (bench_throughput's anchor). The ratio is
a round's time over the time `fit` takes for as many examples.
"""

import os
from typing import Optional

from absl import app
from absl import flags
import numpy as np

from benchmarks import bench_throughput
from benchmarks import common_flags
from benchmarks import report
from benchmarks import spawn

_SIZE = flags.DEFINE_integer("large_image_size", 224, "Side of the upsampled images, px.")
DEFAULT_OUTPUT = os.path.join(report.REPO, "benchmarks", "RESULTS_LARGE_IMAGES.md")
WARMUP_ROUNDS = 2
ROUNDS_PER_REP = 3
RSS_TARGET_GIB = 4.0
RATIO_TARGET = 1.3


def run(data_dir: Optional[str], size: int, repetitions: int, rounds_per_rep: int,
        show_progress: bool = True) -> dict:
  args = ["--num_clients=100", "--clients_per_round=10", f"--upsample={size}",
          f"--rounds={WARMUP_ROUNDS + repetitions * rounds_per_rep}"]
  if data_dir:
    args.append(f"--data_dir={data_dir}")
  # Keras first, on the fresh machine, two epochs per repetition (as bench_throughput).
  keras = bench_throughput.keras_fit(data_dir, repetitions, 2, show_progress=show_progress,
                                     upsample=size)
  tff_point = spawn.run_child(args)
  return {"size": size, "repetitions": repetitions, "tff": tff_point, "keras": keras}


def _figures(raw: dict) -> dict:
  result, keras = raw["tff"], raw["keras"]
  timed = result["round_s"][WARMUP_ROUNDS:]
  examples = float(np.median(result["examples"][WARMUP_ROUNDS:]))
  median = report.median_range(timed)[0]
  keras_per_example = float(np.median(keras["wall_s"])) / keras["examples_per_epoch"]
  peak = result["peak_rss_bytes"]
  return dict(timed=timed, examples=examples, median=median,
              keras_per_example=keras_per_example,
              ratio=median / (examples * keras_per_example), peak=peak,
              total_gib=(peak["main"] + peak["worker"]) / 2**30)


def verdicts(raw: dict) -> list:
  f = _figures(raw)
  rss = ("met" if f["total_gib"] < RSS_TARGET_GIB
         else f"**missed** by {f['total_gib'] - RSS_TARGET_GIB:.2f} GiB")
  ratio = ("met" if f["ratio"] <= RATIO_TARGET
           else f"**missed** by {f['ratio'] / RATIO_TARGET - 1:.0%}")
  return [f"- {raw['size']}-px PneumoniaMNIST, 10 of 100 clients per round: peak RSS (main + "
          f"worker) {f['total_gib']:.2f} GiB, target < {RSS_TARGET_GIB:g}: {rss}; ratio to "
          f"Keras `fit` {f['ratio']:.2f}, target <= {RATIO_TARGET:g}: {ratio}."]


def render(raw: dict) -> str:
  result, keras = raw["tff"], raw["keras"]
  f = _figures(raw)
  timed, examples, median = f["timed"], f["examples"], f["median"]
  keras_per_example, ratio, peak, total_gib = (f["keras_per_example"], f["ratio"], f["peak"],
                                               f["total_gib"])
  pixels_mib = keras["examples_per_epoch"] * raw["size"] ** 2 / 2**20
  rows = [["tff_dpmed round, 10 of 100 clients", f"{examples:.0f}", report.fmt(timed),
           f"{1000 * median / examples:.2f}", f"**{ratio:.2f}x**",
           f"{peak['main'] / 2**30:.2f} + {peak['worker'] / 2**30:.2f} = **{total_gib:.2f}**"],
          ["Keras fit, one epoch", f"{keras['examples_per_epoch']:,}",
           report.fmt(keras["wall_s"]), f"{1000 * keras_per_example:.2f}", "1", "–"]]
  text = report.table(["what", "examples", "seconds", "ms per example", "ratio to Keras fit",
                       "peak RSS main + worker, GiB"], rows)
  verdict = lambda ok: "met" if ok else "MISSED"
  return text + (
      f"\n\nTraining pixels: {pixels_mib:.0f} MiB of uint8 ({raw['size']} px). "
      f"Targets (issue 16): peak RSS < {RSS_TARGET_GIB:g} GiB, {verdict(total_gib < RSS_TARGET_GIB)}"
      f" ({total_gib:.2f}); ratio to Keras fit <= {RATIO_TARGET:g}, "
      f"{verdict(ratio <= RATIO_TARGET)} ({ratio:.2f}). Start to end of round 1: "
      f"{result['end_of_round_1']:.1f} s.\n")


def main(argv):
  del argv
  quick = common_flags.QUICK.value
  size = 64 if quick else _SIZE.value
  reps, per_rep = (1, 1) if quick else (common_flags.REPETITIONS.value, ROUNDS_PER_REP)
  info = report.machine("benchmarks.bench_large_images")
  raw = run(common_flags.DATA_DIR.value, size, reps, per_rep)
  text = "\n\n".join([f"# Large images: {size}-px PneumoniaMNIST beside the worker",
                      report.machine_table(info),
                      "\n\n".join(__doc__.strip().split("\n\n")[1:]), render(raw)])
  print(text)
  report.write(common_flags.OUTPUT.value or DEFAULT_OUTPUT, text, {"machine": info, **raw})


if __name__ == "__main__":
  app.run(main)
