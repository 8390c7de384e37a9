"""Privacy-utility study: test AUC and membership-inference AUC against epsilon.

  python -m experiments.privacy_utility --data_dir=../shared/data/medmnist \\
      --dataset=pneumoniamnist --num_clients=100 --clients_per_round=10 --rounds=12 \\
      --noise_multipliers=0.1,0.2,0.3,0.5,1.0 --seeds=0,1,2 --output_dir=runs/privacy_utility

Trains one run per (DP mode, noise multiplier z, seed) with the library's
training program (`RunConfig` -> `trainer.prepare` -> `trainer.train`): `none`
once per seed, `central` and `local` once per z and seed (or per
`--target_epsilons` value instead of z). Each run has a twin trained with
client-level canaries (`--audit=canary`; off with --nocanary_audit), whose
empirical epsilon goes beside the theoretical one (the canaries move the
model, so the utility comes from the run without them). Every run without
canaries is audited by membership inference with `tff_dpmed.program.audit`
(members: the train split; non-members: the test split). Each run lives in `<output_dir>/runs/<mode>_z<z>_s<seed>/` (`none_s<seed>`
for the baseline, `<mode>_eps<E>_s<seed>` with --target_epsilons). Rerunning
the same command skips runs that have a summary.json (and audits those
without an audit.json); an interrupted run resumes from its checkpoint.

Outputs in <output_dir>/: results.csv (one row per run), results.md (mean ±
std per mode and z, with the command and git commit), privacy_utility.png
(test AUC, MIA AUC and empirical epsilon against epsilon) and training_curves.png (val AUC per
round at --curve_noise_multiplier).

This is the command line; the grid is `experiments.grid`, running it
`experiments.runner`, and the outputs `experiments.report`.
"""

import collections
import math
import os
import shlex
import sys
import time
from typing import Iterable, Optional, Sequence

from absl import flags
from absl import logging

from tff_dpmed import cli
from tff_dpmed.errors import UsageError
from tff_dpmed.privacy.spec import Sampling, choices
# TensorFlow must be imported before absl's app.run calls main (see tff_dpmed/train.py).
from tff_dpmed.program import audit
from tff_dpmed.program import config
from tff_dpmed.program import trainer
from experiments import report
from experiments import runner
from experiments.grid import MODES, StudySettings, make_grid, run_config


def _define_flags() -> None:
  d = config.default  # The trainer's flag defaults.
  f = flags
  f.DEFINE_string("dataset", d("dataset"), "Dataset spec, as for tff_dpmed.train.")
  f.DEFINE_enum("image_size", str(d("image_size")), ["28", "64", "128", "224"], "Image side.")
  f.DEFINE_string("data_dir", None, "Folder of dataset files (default: $TFF_DPMED_DATA_DIR, "
                  "else the user cache).")
  f.DEFINE_integer("num_clients", d("num_clients"), "Simulated institutions (privacy units).")
  f.DEFINE_enum("partition", d("partition"), ["iid", "dirichlet"], "Client split.")
  f.DEFINE_integer("clients_per_round", 10, "Expected clients per round.")
  f.DEFINE_enum("sampling", d("sampling"), list(choices(Sampling)), "Client sampling.")
  f.DEFINE_integer("rounds", 12, "Federated rounds per run.")
  f.DEFINE_string("model", d("model"), "cnn, gap_cnn or resnet18 (tff_dpmed.models).")
  f.DEFINE_integer("client_batch_size", 32, "Local batch size.")
  f.DEFINE_float("client_learning_rate", d("client_learning_rate"), "Client SGD learning rate.")
  f.DEFINE_float("server_learning_rate", d("server_learning_rate"), "Server learning rate "
                 "(the committed results/ used 1.0, the trainer's default then).")
  f.DEFINE_integer("rounds_per_eval", 2, "Val evaluation (and training-curve point) every N "
                   "rounds.")
  f.DEFINE_list("modes", list(MODES), "DP modes to run: none, central, local.")
  f.DEFINE_list("noise_multipliers", ["0.1", "0.2", "0.3", "0.5", "1.0"],
                "Noise multipliers z of the DP runs (at least 5 for the study).")
  f.DEFINE_list("target_epsilons", None, "Instead of --noise_multipliers: the epsilons to "
                "calibrate z to (per mode: local DP needs much more noise).")
  f.DEFINE_list("seeds", ["0", "1", "2"], "Seeds in [0, 2^32) (at least 3 for the study): "
                "splits, init, client shuffling, local noise, and the cohorts of no-DP runs. "
                "Central DP noise and DP runs' client sampling are never seeded.")
  f.DEFINE_bool("seeded", True, "Pass each seed to the runs (reproducible; the trainer warns "
                "that seeded local-DP noise is not private in deployment, though its "
                "distribution, and so utility and accounted epsilon, are the same). False: "
                "unseeded runs, the seed only names a replicate.")
  f.DEFINE_float("clip", 0.1, "Fixed clip norm of local DP (and of central DP with "
                 "--central_clip_mode=fixed). Local DP's signal-to-noise ratio does not depend "
                 "on it, but its noise magnitude (zC per coordinate) does: at C=1 the small CNN's "
                 "weights blow up within a few rounds.")
  f.DEFINE_enum("central_clip_mode", "adaptive", ["adaptive", "fixed"],
                "Central DP clipping; local DP always clips at the fixed --clip.")
  f.DEFINE_float("central_clip", d("clip"), "Initial clip norm of central adaptive clipping.")
  f.DEFINE_float("curve_noise_multiplier", None, "The z of training_curves.png (one of "
                 "--noise_multipliers; default: the middle one).")
  f.DEFINE_float("curve_target_epsilon", None, "With --target_epsilons: the value for "
                 "training_curves.png (default: the middle one).")
  f.DEFINE_bool("canary_audit", True, "Give every run a twin with client-level canaries "
                "(--audit=canary of the trainer) and report the twin's empirical epsilon "
                "beside the theoretical one. The canaries join the rounds and move the "
                "model, so the utility columns come from the run without them.")
  f.DEFINE_integer("audit_max_examples", 2000, "Members and non-members per audit (at most).")
  f.DEFINE_integer("audit_seed", 0, "Seed of the audit's subsampling and attacks.")
  f.DEFINE_enum("audit_nonmembers", "test", list(audit.NONMEMBER_SPLITS), "The audit's "
                "non-members. test: never touched by training, but shifted from train on "
                "some datasets (PneumoniaMNIST), which the attacks pick up as 'membership'; "
                "val: same source as train, used only to pick the best round.")
  f.DEFINE_string("output_dir", "runs/privacy_utility", "Study folder: runs/ and results.")
  f.DEFINE_integer("parallel", 1, "Runs at once. 1: one after another in this process; N > 1: "
                   "N fresh processes (each run uses ~1 core; mind the machine's cores).")
  f.DEFINE_bool("keep_checkpoints", False, "Keep each finished run's checkpoints/ (not "
                "needed to resume the study: finished runs are skipped).")
  f.DEFINE_bool("results_only", False, "Only (re)write results and figures from the runs "
                "that exist; train nothing.")
  f.DEFINE_bool("progress", True, "Show a progress bar over the grid.")


def _floats(name: str, values: Optional[Iterable[str]]) -> list:
  try:
    return [float(v) for v in values or []]
  except ValueError:
    raise UsageError(f"--{name}={','.join(values)} must be a comma-separated list of numbers")


def _ints(name: str, values: Iterable[str]) -> list:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UsageError(f"--{name}={','.join(values)} must be a comma-separated list of integers")


def _middle(values: Sequence[float]) -> Optional[float]:
  return sorted(values)[len(values) // 2] if values else None


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}: all options are --flags")
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  z_values = _floats("noise_multipliers", FLAGS.noise_multipliers)
  eps_values = _floats("target_epsilons", FLAGS.target_epsilons)
  if eps_values and FLAGS["noise_multipliers"].present:
    raise UsageError("--noise_multipliers and --target_epsilons are alternatives: give only one")
  if eps_values:
    z_values = []
  points = make_grid(FLAGS.modes, _ints("seeds", FLAGS.seeds), z_values, eps_values,
                     canary_twins=FLAGS.canary_audit)
  levels = eps_values or z_values
  curve_flag = "curve_target_epsilon" if eps_values else "curve_noise_multiplier"
  curve_level = getattr(FLAGS, curve_flag)
  if curve_level is None:
    curve_level = _middle(levels)
  elif not any(math.isclose(curve_level, v) for v in levels):
    raise UsageError(f"--{curve_flag}={curve_level:g} is not in the grid "
                     f"({', '.join(f'{v:g}' for v in levels)})")
  if FLAGS.parallel < 1:
    raise UsageError(f"--parallel={FLAGS.parallel} must be >= 1")
  base = dict(dataset=FLAGS.dataset, image_size=int(FLAGS.image_size), data_dir=FLAGS.data_dir,
              num_clients=FLAGS.num_clients, partition=FLAGS.partition,
              clients_per_round=FLAGS.clients_per_round, sampling=FLAGS.sampling,
              rounds=FLAGS.rounds, model=FLAGS.model, client_batch_size=FLAGS.client_batch_size,
              client_learning_rate=FLAGS.client_learning_rate,
              server_learning_rate=FLAGS.server_learning_rate,
              rounds_per_eval=FLAGS.rounds_per_eval)
  settings = StudySettings(base=base, output_dir=FLAGS.output_dir, clip=FLAGS.clip,
                           central_clip_mode=FLAGS.central_clip_mode,
                           central_clip=FLAGS.central_clip,
                           audit_max_examples=FLAGS.audit_max_examples,
                           audit_seed=FLAGS.audit_seed,
                           audit_nonmembers=FLAGS.audit_nonmembers,
                           keep_checkpoints=FLAGS.keep_checkpoints,
                           seeded=FLAGS.seeded)
  for p in points:  # Every config is checked (by its construction) before anything runs.
    run_config(p, settings)
  if len(levels) < 5 or len(points) and len({p.seed for p in points}) < 3:
    print(f"note: {len(levels)} grid values and {len({p.seed for p in points})} seeds: the "
          "study wants at least 5 and 3", file=sys.stderr)
  command = "python -m experiments.privacy_utility " + shlex.join(argv_for_record())
  statuses = {}
  if not FLAGS.results_only:
    todo = [p for p in points if not runner.is_complete(p, settings)]
    if todo:  # Bad data or output flags end here, before the grid starts.
      trainer.prepare(run_config(todo[0], settings))
    t0 = time.time()
    statuses = runner.run_grid(points, settings, parallel=FLAGS.parallel, show_progress=FLAGS.progress)
    counts = collections.Counter(s.split(":")[0] for s in statuses.values())
    print(f"grid of {len(points)} runs done in {time.time() - t0:.0f}s: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=sys.stderr)
  failed = {k: v for k, v in statuses.items() if v.startswith("failed")}
  repo_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  setting = report.describe_setting(base, settings, FLAGS.canary_audit)
  rows = report.write_outputs(points, settings, command, report.git_commit(repo_dir),
                              curve_level, setting, failed)
  print(f"{len(rows)} of {sum(not p.canaries for p in points)} runs in "
        f"{os.path.join(settings.output_dir, report.RESULTS_CSV)}; table {report.RESULTS_MD}, "
        f"figures {report.PRIVACY_UTILITY_PNG} and {report.TRAINING_CURVES_PNG}")
  if failed:
    sys.exit(1)


def argv_for_record() -> list:
  return sys.argv[1:]


def run():
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
