"""Scale: steady round time and peak memory at 100, 1,000 and 10,000 total clients.

  python -m benchmarks.bench_scale [--data_dir=...] [--scale_clients=100,1000,10000]
      [--scale_clients_per_round=50] [--repetitions=3] [--scale_rounds_per_rep=3]
      [--scale_data=shared|copied]

Every client holds as many examples as one of PneumoniaMNIST's 100-client
split (47), drawn with replacement from the 4,708 real training images. By
default clients share those images (`--scale_data=shared`): what grows is the
number of clients and their index lists, not the pixels. `--scale_data=copied`
gives each client its own copies, so the data grows too (10,000 clients:
470,000 images, 369 MB); see the Levers section for why that is not the
default. The cohort stays at 50 clients, so the work per round is the same at
every point. Each point runs in its own process (benchmarks.child);
its rounds after the first two are cut into `--repetitions` blocks, each
block's median being one repetition. Peak RSS is VmHWM of that process plus
its TFF worker_binary, read just before the worker stops.
"""

from typing import Optional, Sequence

from absl import app
from absl import flags
import tqdm

from benchmarks import common_flags
from benchmarks import report
from benchmarks import spawn

_CLIENTS = flags.DEFINE_list("scale_clients", ["100", "1000", "10000"], "Total clients per point.")
_PER_ROUND = flags.DEFINE_integer("scale_clients_per_round", 50, "Cohort size at every point.")
_ROUNDS_PER_REP = flags.DEFINE_integer("scale_rounds_per_rep", 3, "Timed rounds per repetition.")
_DATA = flags.DEFINE_enum("scale_data", "shared", ["shared", "copied"],
                          "Clients share the real images, or each has its own copies.")

WARMUP_ROUNDS = 2  # Round 1 traces; round 2 is also left out, as in bench_round_time.


def run(data_dir: Optional[str], clients: Sequence[int], clients_per_round: int,
        repetitions: int, rounds_per_rep: int, contender: str = "tff_dpmed",
        data: str = "shared", dataset: str = "pneumoniamnist",
        show_progress: bool = True) -> list:
  """One child result per point (its first WARMUP_ROUNDS rounds untimed)."""
  out = []
  for n in tqdm.tqdm(clients, desc="scale (one process per point)", unit="point",
                     disable=not show_progress, dynamic_ncols=True):
    args = [f"--contender={contender}", f"--num_clients={n}", f"--resample={data}",
            f"--clients_per_round={min(clients_per_round, n)}",
            f"--rounds={WARMUP_ROUNDS + repetitions * rounds_per_rep}", f"--dataset={dataset}"]
    if data_dir:
      args.append(f"--data_dir={data_dir}")
    result = spawn.run_child(args)
    result.update(repetitions=repetitions, scale_data=data)
    out.append(result)
  return out


def rep_medians(result: dict, what: str = "round_s") -> list:
  timed = result[what][WARMUP_ROUNDS:]
  per = max(1, len(timed) // result["repetitions"])
  return [report.median_range(timed[i:i + per])[0] for i in range(0, len(timed), per)]


def markdown(results: list) -> str:
  rows = []
  for r in results:
    rss = r["peak_rss_bytes"]
    rows.append([f"{r['num_clients']:,}", f"{r['clients_per_round']}",
                 f"{r['num_clients'] * 47:,}" + (" (shared)" if r["scale_data"] == "shared" else ""),
                 f"**{report.fmt(rep_medians(r))}**", report.fmt(rep_medians(r, "round_cpu_s")),
                 f"{r['round_s'][0]:.1f}", f"{r['end_of_round_1']:.1f}",
                 f"**{(rss['main'] + rss['worker']) / 2**30:.2f}**",
                 f"{rss['main'] / 2**30:.2f} + {rss['worker'] / 2**30:.2f}"])
  return report.table(
      ["total clients", "clients/round", "client examples", "s/round", "CPU s/round",
       "round 1 s", "process start to end of round 1, s", "peak RSS GiB",
       "(main + worker)"], rows)


def main(argv):
  del argv
  print(markdown(run(common_flags.DATA_DIR.value, [int(c) for c in _CLIENTS.value],
                     _PER_ROUND.value, common_flags.REPETITIONS.value, _ROUNDS_PER_REP.value,
                     data=_DATA.value)))


if __name__ == "__main__":
  app.run(main)
