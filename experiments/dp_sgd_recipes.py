"""Example-level DP (DP-SGD in each hospital): the documented recipes, run and tabulated.

  python -m experiments.dp_sgd_recipes [--runs=3] [--only=pneumonia_iid_eps3,...]
      [--data_dir=...] [--output_dir=experiments/results/dp_sgd]

Each recipe was tuned once on the val split (README "Example-level DP");
here every recipe runs `--runs` times, unseeded (a seeded DP-SGD run is not
private: its batches and noise are predictable), and the table gives the mean
and spread of the test AUC of each run's best-val round: the test split is
read once per run, by the trainer. Runs are the trainer's CLI, one at a time
(the machine has two cores); a finished run is kept and a killed one resumes
from its checkpoint, so the study itself resumes where it stopped.
"""

import os
import time

from absl import app
from absl import flags
import tqdm

from experiments import recipes
from experiments.recipes import Recipe

_RUNS = flags.DEFINE_integer("runs", 3, "Independent runs per recipe.")
_ONLY = flags.DEFINE_list("only", [], "Run only these recipes (default: all).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MedMNIST folder (default: the trainer's).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", os.path.join("experiments", "results", "dp_sgd"),
                                  "Where the runs, results.md and results.csv go.")

# What every recipe shares: 10 hospitals, all in every round (example-level
# accounting counts every round for every hospital anyway), one local epoch.
_COMMON = ("--num_clients=10", "--clients_per_round=10", "--sampling=all", "--client_epochs=1",
           "--server_learning_rate=1.0", "--server_momentum=0", "--rounds_per_eval=2",
           "--clip_mode=fixed")


def _scatter(batch: int, lr: float, rounds: int, clip: float = 1.0) -> tuple:
  return _COMMON + ("--model=scatter_linear", f"--client_batch_size={batch}",
                    f"--client_learning_rate={lr:g}", f"--rounds={rounds}", f"--clip={clip:g}")


def _fixed_rate(batch: int, lr: float, rounds: int) -> tuple:
  return _scatter(batch, lr, rounds) + ("--local_batching=fixed_rate",)


def _three(name: str, dataset: str, partition: str, flags: tuple) -> tuple:
  """A recipe at eps 3 and eps 1, and the same recipe with z = 0 (not private)."""
  # The non-private run is the same DP-SGD recipe (Poisson batches, clipping)
  # without noise, so the rows differ in the noise only.
  return tuple(Recipe(f"{name}_{suffix}", dataset, partition, "example", target, flags)
               for suffix, target in (("eps3", 3.0), ("eps1", 1.0), ("nodp", None)))


# Tuned on val (see README).
RECIPES = (
    *_three("pneumonia_iid", "pneumoniamnist", "iid", _scatter(128, 4.0, 20)),
    # Calibrated for eps 1, where the recipe above sits at the target: of six
    # variants tried on val at eps 1 (mean val AUC of two runs: B=128 0.951,
    # B=256 0.959, B=256 fixed_rate 0.967, B=384 0.960, B=256 lr 8 0.950, all
    # 20 rounds; B=256 10 rounds 0.970), the best. Fewer, larger steps: less
    # noise per step at the same budget.
    *_three("pneumonia_iid_b256_r10", "pneumoniamnist", "iid", _scatter(256, 4.0, 10)),
    # Non-IID: one sampling rate for all hospitals and a size-weighted mean,
    # B=256 (the best of seven tried on val at eps 1)...
    *_three("pneumonia_dirichlet_b256", "pneumoniamnist", "dirichlet",
            _fixed_rate(256, 4.0, 20)),
    # ...and, as it missed the no-noise target (test 0.935 < 0.95), the same at
    # 40 rounds: of three longer variants tried on val (30 or 40 rounds, 2 local
    # epochs; 1-2 runs each), the best without noise (val 0.993) whose eps 1 and
    # eps 3 val AUCs stay within 0.02 of the 20-round recipe's.
    *_three("pneumonia_dirichlet_b256_r40", "pneumoniamnist", "dirichlet",
            _fixed_rate(256, 4.0, 40)),
    # The IID recipe, B=128, as first tried (it missed at eps 1).
    *_three("pneumonia_dirichlet", "pneumoniamnist", "dirichlet", _fixed_rate(128, 4.0, 20)),
    # The same split with a fixed expected batch of 32 in every hospital (the
    # best of three tried): its 72-image hospital sets everyone's noise.
    *_three("pneumonia_dirichlet_fixed_size", "pneumoniamnist", "dirichlet",
            _scatter(32, 2.0, 10)),
    *_three("breast_iid", "breastmnist", "iid", _scatter(32, 2.0, 30)),
)


def _write(rows: list, output_dir: str, wall: float) -> None:
  recipes.write_table(rows, output_dir, [
      "# Example-level DP (DP-SGD in each hospital): recipes and results", "",
      f"`python -m experiments.dp_sgd_recipes --runs={_RUNS.value}`; this invocation "
      f"took {wall / 60:.1f} min of wall time on this machine (finished runs are reused).",
      "Test AUC is each run's best-val round, mean ± sd over unseeded runs; epsilon is "
      "per example (one patient's image) at the given delta, for the worst hospital."])


def main(argv) -> None:
  del argv
  start = time.time()
  chosen = [r for r in RECIPES if not _ONLY.value or r.name in _ONLY.value]
  unknown = set(_ONLY.value) - {r.name for r in RECIPES}
  if unknown:
    raise app.UsageError(f"--only: unknown recipes {', '.join(sorted(unknown))}; use "
                         f"{', '.join(r.name for r in RECIPES)}")
  output_dir = _OUTPUT_DIR.value
  os.makedirs(output_dir, exist_ok=True)
  rows = []
  jobs = [(r, i) for r in chosen for i in range(_RUNS.value)]
  done: dict = {}
  for recipe, run in tqdm.tqdm(jobs, desc="recipe runs", unit="run", dynamic_ncols=True):
    done.setdefault(recipe.name, []).append(
        recipes.run_recipe(recipe, run, _DATA_DIR.value, output_dir))
    if len(done[recipe.name]) == _RUNS.value:
      rows.append(recipes.row(recipe, done[recipe.name]))
      _write(rows, output_dir, time.time() - start)  # Partial results as they come.
  for row in rows:
    print(" ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
  app.run(recipes.stop_as_one_line(main))
