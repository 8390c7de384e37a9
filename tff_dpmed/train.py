"""Train a medical image classifier with DP-FedAvg across simulated hospitals.

  python -m tff_dpmed.train --noise_multiplier=1.1 --data_dir=../shared/data/medmnist

Writes <output_dir>/<experiment_name>/: metrics.csv, summary.json, tensorboard/,
checkpoints/, saved_model/<model>/<version>/. Rerunning the same command resumes.
"""

import functools
import sys
from typing import Optional

from absl import flags
from absl import logging

from tff_dpmed import cli
from tff_dpmed import files
from tff_dpmed.privacy import canary_estimate
from tff_dpmed.privacy import one_run_audit
# TensorFlow must be imported before absl's app.run calls main: imported first
# inside main, Keras fails to build functional models (Flatten sees None).
from tff_dpmed.privacy.spec import Accountant, ClipMode, DPMode, Sampling, choices
from tff_dpmed.program import trainer
from tff_dpmed.program import config as config_lib
from tff_dpmed.program.config import EXECUTORS, PARTITIONS, RunConfig, default


class _Defaults:
  def __getattr__(self, name):
    return default(name)


_D = _Defaults()
FLAGS = flags.FLAGS

# Data.
flags.DEFINE_string("dataset", _D.dataset, "A MedMNIST 2-D name (pneumoniamnist, bloodmnist, "
                    "chestmnist, ...), tfds:NAME for a TFDS image dataset, or folder:PATH for a "
                    "folder with one sub-folder of images per class.")
flags.DEFINE_enum("image_size", str(_D.image_size), ["28", "64", "128", "224"],
                  "Image side in pixels: picks <name>.npz (28) or <name>_<size>.npz.")
flags.DEFINE_string("data_dir", None, "Folder with the dataset files. Default: "
                    "$TFF_DPMED_DATA_DIR, else the user cache folder (downloads go there).")
flags.DEFINE_bool("download", _D.download, "Download a missing MedMNIST file (MD5-checked).")
flags.DEFINE_integer("num_clients", _D.num_clients, "Simulated institutions (privacy units).")
flags.DEFINE_enum("partition", _D.partition, PARTITIONS, "How examples are split over clients: "
                  "iid, dirichlet (label skew), or per_example (patients as clients: one "
                  "example per client; needs --num_clients = the training examples).")
flags.DEFINE_float("dirichlet_alpha", _D.dirichlet_alpha,
                   "Label-skew concentration for --partition=dirichlet; smaller is more skewed.")
# Model and optimisation.
flags.DEFINE_string("model", _D.model, "cnn (small, fast default), gap_cnn (global average pooling; "
                    "generalises to shifted test data), gap_cnn_gn (gap_cnn with GroupNorm), "
                    "resnet18 (GroupNorm), or scatter_linear / scatter_cnn (a linear model or "
                    "small CNN trained on fixed wavelet scattering features, which DP training "
                    "learns best from: Tramer & Boneh 2021).")
flags.DEFINE_integer("rounds", _D.rounds, "Federated rounds.")
flags.DEFINE_integer("clients_per_round", _D.clients_per_round,
                     "Expected clients per round (exact for --sampling=fixed).")
flags.DEFINE_enum("sampling", _D.sampling, choices(Sampling), "Client sampling, as the accountant "
                  "assumes it: poisson (each client with q=clients_per_round/num_clients), "
                  "fixed (uniform without replacement), all.")
flags.DEFINE_integer("client_epochs", _D.client_epochs, "Local epochs per round.")
flags.DEFINE_integer("client_batch_size", _D.client_batch_size, "Local batch size.")
flags.DEFINE_float("client_learning_rate", _D.client_learning_rate, "Client SGD learning rate.")
flags.DEFINE_float("server_learning_rate", _D.server_learning_rate, "Server learning rate.")
flags.DEFINE_float("server_momentum", _D.server_momentum, "Server SGD momentum (0 = none).")
# Privacy.
flags.DEFINE_enum("dp_mode", _D.dp_mode, choices(DPMode), "central: the server adds noise once to "
                  "the clipped sum; central_tree: DP-FTRL, tree-aggregated noise over the "
                  "rounds (--sampling=all, --clip_mode=fixed); local: each client noises its own update; example: DP-SGD "
                  "inside each client (patient-level DP; needs --clip_mode=fixed, --clip is the "
                  "per-example clip); none: baseline.")
flags.DEFINE_enum("client_dp", _D.client_dp, ("none", "central"), "With --dp_mode=example: "
                  "also clip each client's update to --server_clip and noise the sum at the "
                  "server with --server_noise_multiplier (a client-level guarantee beside the "
                  "example-level one).")
flags.DEFINE_enum("local_batching", _D.local_batching, ("fixed_size", "fixed_rate"),
                  "With --dp_mode=example: fixed_size samples an expected batch of "
                  "--client_batch_size in every hospital (rate B/n_k: the smallest hospital "
                  "is the worst off); fixed_rate samples every hospital at one rate "
                  "B*clients/examples (B is the average hospital's batch), so all have the "
                  "same epsilon, and the server weights updates by hospital size.")
flags.DEFINE_float("server_noise_multiplier", None, "--client_dp=central: the client-level z.")
flags.DEFINE_float("server_clip", None, "--client_dp=central: clip norm of each client update.")
flags.DEFINE_float("noise_multiplier", None, "Noise stddev / clip norm (z).")
flags.DEFINE_float("target_epsilon", None, "Instead of --noise_multiplier: the smallest noise "
                   "that meets this epsilon after --rounds.")
flags.DEFINE_float("max_epsilon", None, "Stop cleanly before a round would exceed this epsilon.")
flags.DEFINE_float("delta", None, "Target delta. Default: below 1/num_clients.")
flags.DEFINE_enum("accountant", _D.accountant, choices(Accountant), "auto = PLD where it applies, else RDP.")
flags.DEFINE_enum("clip_mode", _D.clip_mode, choices(ClipMode), "adaptive (Andrew et al. 2021) or fixed.")
flags.DEFINE_float("clip", _D.clip, "Fixed clip norm, or the initial one for adaptive clipping.")
flags.DEFINE_float("target_unclipped_quantile", _D.target_unclipped_quantile,
                   "Adaptive clipping: the quantile of update norms to track.")
flags.DEFINE_float("adaptive_clip_learning_rate", _D.adaptive_clip_learning_rate,
                   "Adaptive clipping: geometric learning rate of the clip norm.")
flags.DEFINE_float("clipped_count_stddev", None, "Adaptive clipping: noise on the clipped "
                   "count. Default: max(0.05*clients_per_round, noise_multiplier), so small "
                   "cohorts work (TFF's 0.05*clients_per_round alone fails below ~12 at z=1.1).")
# Program.
flags.DEFINE_integer("rounds_per_eval", _D.rounds_per_eval, "Evaluate on val every N rounds.")
flags.DEFINE_integer("rounds_per_checkpoint", _D.rounds_per_checkpoint,
                     "Checkpoint every N rounds (and on SIGINT/SIGTERM).")
flags.DEFINE_string("output_dir", _D.output_dir, "Root folder for runs.")
flags.DEFINE_string("experiment_name", _D.experiment_name, "Run folder under --output_dir.")
flags.DEFINE_integer("seed", None, "Seed for splits, init and local-DP noise, and for client "
                     "sampling only without DP or with --insecure_reproducible_sampling. For "
                     "debugging only: seeded noise is predictable. Default: non-deterministic.")
flags.DEFINE_bool("insecure_reproducible_sampling", False, "DP modes: seed client sampling "
                  "with --seed too. Whoever knows the seed knows every cohort, so epsilon is "
                  "then reported WITHOUT amplification by sampling.")
flags.DEFINE_string("budget_ledger", None, "A JSON file shared by every run on this data: "
                    "each run adds what it released, and `python -m tff_dpmed.privacy "
                    "--budget_ledger=PATH` prints the total epsilon. Default: off.")
flags.DEFINE_bool("debug_metrics", False, "DP modes: also write per-round train loss and "
                  "accuracy, cohort size and round time. They are NOT covered by epsilon: "
                  "debugging only (always written with --dp_mode=none).")
flags.DEFINE_bool("restart", False, "Discard the run folder's checkpoints and metrics.")
flags.DEFINE_enum("audit", _D.audit, config_lib.AUDITS, "An empirical privacy audit, into "
                  "summary.json: mia runs TF Privacy's membership-inference attacks on the "
                  "final model (train examples = members, test = non-members; --audit alone "
                  "means mia); canary: in client-level modes, --num_canaries canary "
                  "clients and an epsilon estimate from the final model (Andrew et al. "
                  "2024); with --dp_mode=example, --num_canaries canary examples each in "
                  "the data with probability 1/2 and an epsilon lower bound (Steinke et al. "
                  "2023). See README 'Reading the canary audit'.")
flags.DEFINE_integer("num_canaries", None, "--audit=canary: canary clients, each joining "
                     "a round with the real clients' sampling rate (default "
                     f"{config_lib.DEFAULT_NUM_CANARIES}); with --dp_mode=example, canary "
                     f"examples made from training examples (default "
                     f"{config_lib.DEFAULT_NUM_EXAMPLE_CANARIES}, at most a tenth of them).")
flags.DEFINE_float("canary_norm", None, "--audit=canary: L2 norm of a canary's update. "
                   "Default: --clip (fixed clipping, and --dp_mode=none, where it is only "
                   "the reference canaries' size); with adaptive clipping, far above any "
                   "clip norm, so the aggregator clips each canary to the round's clip.")
# Runtime.
flags.DEFINE_enum("executor", _D.executor, EXECUTORS, "local: start a TFF worker of our own; "
                  "remote: run on the TFF workers at --workers, clients spread across them.")
flags.DEFINE_string("workers", None, "With --executor=remote: HOST:PORT[,HOST:PORT...] of "
                    "running `python -m tff_dpmed.worker` processes.")
flags.DEFINE_string("worker_binary", None, "With --executor=local: the TFF worker_binary to "
                    "run, e.g. a CUDA build (see BUILD_NOTES.md). Default: the one TFF ships.")
flags.DEFINE_integer("max_concurrent_computation_calls", -1,
                     "With --executor=local: bound on parallel client computations in the TFF "
                     "worker, which bounds its memory (-1 = no bound).")
flags.DEFINE_enum("client_packing", _D.client_packing, config_lib.CLIENT_PACKINGS,
                  "One-example clients (--partition=per_example) with --dp_mode=central and "
                  "fixed clipping: send each round's sampled clients to TFF in packs of "
                  "PATIENTS_PER_PACK, each client's update clipped on its own inside the "
                  "pack (the same release, the same epsilon, far less per-client overhead). "
                  "auto: wherever that holds; on: refuse a run where it does not; off: never.")
# Worker network security (issue 17): see README "Scale-out on TFF workers".
flags.DEFINE_bool("insecure_local_executor", False, "With --executor=local: run the TFF worker "
                  "on this host's network, where its unauthenticated executor port listens on "
                  "ALL interfaces (the binary cannot bind loopback only) and anyone reaching it "
                  "runs code as you. Only for machines that cannot make a private network "
                  "namespace (unshare). Default: the worker is reached by a private Unix socket.")
flags.DEFINE_string("worker_tls_ca", None, "With --executor=remote: CA certificate (PEM) that "
                    "signed the workers' --tls_cert; with --worker_tls_cert/--worker_tls_key.")
flags.DEFINE_string("worker_tls_cert", None, "With --executor=remote: our client certificate "
                    "(PEM), signed by the workers' --tls_client_ca.")
flags.DEFINE_string("worker_tls_key", None, "With --executor=remote: the private key (PEM) of "
                    "--worker_tls_cert.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def config_from_flags() -> RunConfig:
  names = ("dataset", "data_dir", "download", "num_clients", "partition", "dirichlet_alpha",
           "model", "rounds", "clients_per_round", "sampling", "client_epochs",
           "client_batch_size", "client_learning_rate", "server_learning_rate",
           "server_momentum", "dp_mode", "client_dp", "local_batching",
           "server_noise_multiplier", "server_clip",
           "noise_multiplier", "target_epsilon", "max_epsilon",
           "delta", "accountant", "clip_mode", "clip", "target_unclipped_quantile",
           "adaptive_clip_learning_rate", "clipped_count_stddev", "rounds_per_eval",
           "rounds_per_checkpoint", "output_dir", "experiment_name", "seed", "restart", "audit",
           "num_canaries", "canary_norm",
           "debug_metrics", "budget_ledger", "max_concurrent_computation_calls", "client_packing",
           "executor",
           "workers", "worker_binary", "insecure_local_executor", "worker_tls_ca",
           "worker_tls_cert", "worker_tls_key")
  flat = {name: FLAGS[name].value for name in names}
  flat.update(image_size=int(FLAGS.image_size),
              reproducible_sampling=FLAGS.insecure_reproducible_sampling)
  config_lib.check_noise_flags(flat)
  return RunConfig.from_json(flat)


def main(argv, hooks: Optional[trainer.RoundHooks] = None):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}: all options are --flags (see --helpfull)")
  logging.set_verbosity(logging.WARNING)
  run = trainer.prepare(config_from_flags())
  if run.mechanism.spec.reproducible_sampling:
    print("warning: --insecure_reproducible_sampling: client sampling is seeded, so epsilon "
          "is reported without amplification by sampling", file=sys.stderr, flush=True)
  try:
    summary = trainer.train(run, show_progress=FLAGS.progress,
                            hooks=hooks or trainer.RoundHooks())
  except trainer.TrainingError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  p = summary["privacy"]
  eps = "inf (no DP)" if p["epsilon"] is None else f"{p['epsilon']:.3f}"
  print(f"test accuracy {summary['test_accuracy']:.4f}  test AUC {summary['test_auc']:.4f}  "
        f"epsilon {eps}  delta {p['delta']}  ({p['dp_mode']} DP"
        + (f", {p['privacy_unit']}-level" if p.get("privacy_unit") else "") + ", round "
        f"{summary['selected_round']} of {summary['rounds_completed']}, "
        f"{summary['wall_seconds']:.0f}s)")
  if run.config.audit == "mia":
    a = summary["audit"]
    print(f"membership-inference audit: attack AUC {a['attack_auc']:.3f}, attacker advantage "
          f"{a['attacker_advantage']:.3f}")
  elif run.config.example_canaries:
    print(one_run_audit.format_result(summary["audit"]))
  elif run.config.audit == "canary":
    print(canary_estimate.format_result(summary["audit"]))
  if "client_level" in p:
    c = p["client_level"]
    print(f"client-level (server) epsilon {c['epsilon']:.3f}  delta {c['delta']}  (per hospital, "
          "on top of the example-level guarantee)")
  print(f"run folder: {run.config.run_dir}   SavedModel: {summary['saved_model']}")
  print(files.dumps({k: summary[k] for k in ("test_accuracy", "test_auc")} |
                    {"epsilon": p["epsilon"], "delta": p["delta"],
                     "privacy_unit": p.get("privacy_unit")}))


def run(hooks: Optional[trainer.RoundHooks] = None):
  """The CLI; `hooks` act inside the round loop (tests use them to act at exact points)."""
  # --audit alone (a bool flag before issue 15) keeps meaning membership inference.
  cli.run(functools.partial(main, hooks=hooks),
          bare_flags={"--audit": "--audit=mia", "--noaudit": "--audit=none"})


if __name__ == "__main__":
  run()
