"""Bad input to `python -m tff_dpmed.train`: one `error:` line, exit code 2, nothing written.

Every case runs the real CLI in a subprocess (as a user would) and checks that
`trainer.prepare` (or flag parsing) rejects it before anything reaches the
output folder: exit code 2, no traceback, and exactly one line of stderr
besides TensorFlow's start-up log noise, `error: ...`, naming the problem.

Each subprocess imports TensorFlow (~5 s), so the selected cases are started
together on a small thread pool when the first one runs; every case is still
its own test id and reports its own failure.
"""

import concurrent.futures
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
from typing import Callable, Optional

import numpy as np
import pytest

from tests import data_fixtures

REPO = pathlib.Path(__file__).resolve().parents[2]
# Two cores are shared with other work; two TensorFlow imports at a time is enough.
MAX_PARALLEL = 2
TIMEOUT_S = 300

BASE_FLAGS = ("--experiment_name=x", "--rounds=2", "--num_clients=10", "--clients_per_round=5",
              "--progress=false")

# TensorFlow/absl start-up chatter: timestamped C++ log lines, absl's I1127-style
# prefixes, and the CPU/GPU notices (one of which spans two lines).
_NOISE_PREFIX = re.compile(r"^(\d{4}-\d\d-\d\d[ T]|[IWEF]\d{4} )")
_NOISE_WORDS = ("cuda", "tensorrt", "onednn", "cpu_feature_guard", "instructions")


def _is_noise(line: str) -> bool:
  return bool(_NOISE_PREFIX.match(line)) or any(w in line.lower() for w in _NOISE_WORDS)


def _message_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.strip() and not _is_noise(line)]


# --- Synthetic breastmnist.npz files (28x28 grey, 2 classes) -----------------------------


def _fake_dir(tmp: pathlib.Path, **kwargs) -> list[str]:
  folder = tmp / "data"
  folder.mkdir()
  data_fixtures.write_fake_medmnist(str(folder), "breastmnist", **kwargs)
  return [f"--data_dir={folder}", "--dataset=breastmnist", "--download=false"]


def _truncated_npz(tmp: pathlib.Path) -> list[str]:
  folder = tmp / "data"
  folder.mkdir()
  real = pathlib.Path(data_fixtures.real_data_dir()) / "breastmnist.npz"
  with open(real, "rb") as f:
    (folder / "breastmnist.npz").write_bytes(f.read(1000))
  return [f"--data_dir={folder}", "--dataset=breastmnist"]


def _missing_keys(tmp):
  return _fake_dir(tmp, drop=("test_labels",))


def _label_out_of_range(tmp):
  labels = (np.arange(12) % 2).astype(np.uint8)[:, None]
  labels[3, 0] = 5
  return _fake_dir(tmp, overrides={"train_labels": labels})


def _count_mismatch(tmp):
  return _fake_dir(tmp, overrides={"train_labels": (np.arange(11) % 2).astype(np.uint8)[:, None]})


def _wrong_rank(tmp):
  return _fake_dir(tmp, overrides={"train_images": np.zeros((12, 28 * 28), np.uint8)})


def _nan_pixels(tmp):
  arrays = data_fixtures.fake_medmnist_arrays()
  floats = {k: (v.astype(np.float32) / 255.0) for k, v in arrays.items() if k.endswith("_images")}
  floats["train_images"][2, 5, 7] = np.nan
  return _fake_dir(tmp, overrides=floats)


def _output_under_a_file(tmp):
  (tmp / "afile").write_text("not a folder\n")
  return [f"--output_dir={tmp / 'afile' / 'out'}"]


def _run_folder_is_a_file(tmp):
  (tmp / "out").mkdir()
  (tmp / "out" / "x").write_text("a file where the run folder goes\n")
  return []


def _existing_run(tmp, **files) -> list:
  """A run folder `out/x` holding `files` (name -> bytes, or None for a folder)."""
  run = tmp / "out" / "x"
  run.mkdir(parents=True)
  for name, content in files.items():
    if content is None:
      (run / name).mkdir()
    else:
      (run / name).write_bytes(content)
  return []


def _config_json_invalid(tmp):
  return _existing_run(tmp, **{"config.json": b"{not json"})


def _config_json_wrong_type(tmp):
  return _existing_run(tmp, **{"config.json": b"[1, 2, 3]"})


def _config_json_is_a_folder(tmp):
  return _existing_run(tmp, **{"config.json": None})


def _metrics_invalid_bytes(tmp):
  return _existing_run(tmp, **{"metrics.csv": b"round,clients\n1,\xff\xfe\x00\n"})


def _checkpoints_is_a_file(tmp):
  return _existing_run(tmp, **{"checkpoints": b"not a folder"})


def _ledger_corrupt(tmp):
  return _existing_run(tmp, **{"privacy_ledger.json": b"\x00garbage"})


# --- The catalogue ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  flags: tuple = ()
  keywords: tuple = ()          # all must appear in the error line
  setup: Optional[Callable[[pathlib.Path], list]] = None  # extra flags from files it writes
  real_data: bool = True        # pass --data_dir=<the real MedMNIST folder>
  noise: bool = True            # add --noise_multiplier=1.0 so DP validation passes


CASES = (
    Case("noise_multiplier_negative", ("--noise_multiplier=-1",), ("noise_multiplier",),
         noise=False),
    Case("noise_multiplier_nan", ("--noise_multiplier=nan",), ("noise_multiplier",),
         noise=False),
    Case("delta_zero", ("--delta=0",), ("delta",)),
    Case("delta_above_one", ("--delta=1.5",), ("delta",)),
    Case("clients_per_round_above_num_clients", ("--clients_per_round=11",),
         ("clients_per_round", "num_clients")),
    Case("clients_per_round_zero", ("--clients_per_round=0",), ("clients_per_round",)),
    Case("rounds_zero", ("--rounds=0",), ("rounds",)),
    Case("unknown_dataset", ("--dataset=nosuchmnist",), ("nosuchmnist",)),
    Case("unknown_model", ("--model=vgg99",), ("vgg99",)),
    Case("missing_data_dir", (), ("does_not_exist",), real_data=False,
         setup=lambda tmp: [f"--data_dir={tmp / 'does_not_exist'}"]),
    Case("truncated_npz", (), ("breastmnist.npz", "corrupt"), real_data=False,
         setup=_truncated_npz),
    Case("npz_missing_keys", (), ("test_labels",), real_data=False, setup=_missing_keys),
    Case("label_out_of_range", (), ("train_labels", "label 5"), real_data=False,
         setup=_label_out_of_range),
    Case("label_image_count_mismatch", (), ("train_labels", "11 labels", "12 images"),
         real_data=False, setup=_count_mismatch),
    Case("image_wrong_rank", (), ("train_images", "shape"), real_data=False,
         setup=_wrong_rank),
    Case("image_nan_pixels", (), ("train_images", "NaN"), real_data=False,
         setup=_nan_pixels),
    Case("output_dir_unwritable", (), ("not writable", "output_dir"),
         setup=_output_under_a_file),
    Case("target_epsilon_with_noise_multiplier", ("--target_epsilon=8",),
         ("target_epsilon", "noise_multiplier")),
    # 1e-6 is out of reach for every accountant at z <= 1e4 (PLD gives ~8e-5 there).
    Case("target_epsilon_impossible", ("--target_epsilon=0.000001",), ("target epsilon",),
         noise=False),
    # Example-level DP (DP-SGD in the clients).
    Case("example_adaptive_clipping", ("--dp_mode=example", "--clip_mode=adaptive"),
         ("adaptive clipping", "--dp_mode=example", "--clip_mode=fixed")),
    Case("example_batch_above_smallest_hospital",
         ("--dp_mode=example", "--clip_mode=fixed", "--client_batch_size=600"),
         ("batch size 600", "smallest client", "--client_batch_size")),
    Case("example_client_dp_without_server_noise",
         ("--dp_mode=example", "--clip_mode=fixed", "--client_dp=central"),
         ("--server_noise_multiplier", "--server_clip")),
    Case("client_dp_without_example_mode", ("--client_dp=central",), ("--dp_mode=example",)),
    Case("example_target_epsilon_with_seed",
         ("--dp_mode=example", "--clip_mode=fixed", "--target_epsilon=3", "--seed=1"),
         ("--seed", "predictable"), noise=False),
    Case("example_budget_ledger",
         ("--dp_mode=example", "--clip_mode=fixed", "--budget_ledger=b.json"),
         ("--budget_ledger", "example-level")),
    Case("dirichlet_alpha_zero", ("--partition=dirichlet", "--dirichlet_alpha=0"),
         ("dirichlet_alpha",)),
    Case("dirichlet_alpha_negative", ("--partition=dirichlet", "--dirichlet_alpha=-1"),
         ("dirichlet_alpha",)),
    Case("more_clients_than_examples",
         ("--dataset=breastmnist", "--num_clients=10000", "--clients_per_round=5"),
         ("num_clients", "546")),
    Case("unknown_flag", ("--no_such_flag=1",), ("no_such_flag",)),
    Case("bad_enum_value", ("--dp_mode=weird",), ("dp_mode", "weird")),
    Case("local_dp_with_adaptive_clipping", ("--dp_mode=local",), ("clip_mode", "local")),
    # Run folders: names that leave --output_dir, folders that are files, damaged resume files.
    Case("experiment_name_parent", ("--experiment_name=../../x",), ("experiment_name",)),
    Case("experiment_name_absolute", ("--experiment_name=/tmp/x",), ("experiment_name",)),
    Case("experiment_name_empty", ("--experiment_name=",), ("experiment_name",)),
    Case("experiment_name_hidden", ("--experiment_name=.x",), ("experiment_name",)),
    Case("run_folder_is_a_file", (), ("not a folder",), setup=_run_folder_is_a_file),
    Case("config_json_invalid", (), ("config.json", "--restart"), setup=_config_json_invalid),
    Case("config_json_wrong_type", (), ("config.json",), setup=_config_json_wrong_type),
    Case("config_json_is_a_folder", (), ("config.json",), setup=_config_json_is_a_folder),
    Case("metrics_csv_invalid_bytes", (), ("metrics.csv", "--restart"),
         setup=_metrics_invalid_bytes),
    Case("checkpoints_is_a_file", (), ("checkpoints", "not a folder"),
         setup=_checkpoints_is_a_file),
    Case("privacy_ledger_corrupt", (), ("privacy_ledger.json", "--restart"),
         setup=_ledger_corrupt),
    # Extreme numbers: refused with their flag's name, never a traceback or a hang.
    Case("seed_negative", ("--seed=-5",), ("seed",)),
    Case("seed_huge", ("--seed=99999999999999999999999",), ("seed",)),
    Case("clip_underflows_float32", ("--clip_mode=fixed", "--clip=1e-45"), ("clip",)),
    Case("clip_overflows_float32", ("--clip_mode=fixed", "--clip=1e39"), ("clip",)),
    Case("noise_multiplier_overflows_float32", ("--noise_multiplier=1e39",),
         ("noise_multiplier",), noise=False),
    Case("target_epsilon_astronomical", ("--target_epsilon=1e300",), ("target_epsilon",),
         noise=False),
    Case("target_epsilon_absurd_rounds", ("--target_epsilon=3", "--rounds=1000000000"),
         ("rounds",), noise=False),
    Case("rounds_huge", ("--rounds=100000000000",), ("rounds",)),
    Case("learning_rate_overflows_float32", ("--client_learning_rate=1e39",),
         ("client_learning_rate",)),
    Case("insecure_sampling_without_seed", ("--insecure_reproducible_sampling",),
         ("insecure_reproducible_sampling", "--seed")),
)


@dataclasses.dataclass
class Outcome:
  argv: list
  out_dir: pathlib.Path
  proc: subprocess.CompletedProcess
  before: dict                  # the output folder before the run (a case may seed it)


def _run_case(case: Case, tmp: pathlib.Path, real_dir: str) -> Outcome:
  env = {k: v for k, v in os.environ.items() if k != "TFF_DPMED_DATA_DIR"}
  # Never touch the user's cache or the network, whatever a case does.
  env["XDG_CACHE_HOME"] = str(tmp / "cache")
  env["TFF_DPMED_MEDMNIST_URL"] = f"http://127.0.0.1:{data_fixtures.closed_port()}"
  flags = [*BASE_FLAGS, f"--output_dir={tmp / 'out'}"]
  if case.real_data:
    flags.append(f"--data_dir={real_dir}")
  if case.noise:
    flags.append("--noise_multiplier=1.0")
  flags += list(case.flags)
  if case.setup is not None:
    flags += case.setup(tmp)  # Later flags win in absl, so a case can override the base.
  out_dir = pathlib.Path([f for f in flags if f.startswith("--output_dir=")][-1].split("=", 1)[1])
  before = _snapshot(out_dir)
  argv = [sys.executable, "-m", "tff_dpmed.train", *flags]
  proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT_S, check=False)
  return Outcome(argv, out_dir, proc, before)


def _snapshot(folder: pathlib.Path) -> dict:
  """Every path under `folder` with its bytes (None for folders)."""
  if not folder.is_dir():
    return {}
  return {str(p): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, data_dir):
  """Starts every selected case at once on a small pool; case id -> Future[Outcome]."""
  selected = {item.callspec.id for item in request.session.items
              if getattr(item, "originalname", None) == "test_bad_input_is_one_line_error"
              and hasattr(item, "callspec")}
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_PARALLEL)
  futures = {}
  try:
    for case in CASES:
      if case.id in selected:
        futures[case.id] = pool.submit(_run_case, case, tmp_path_factory.mktemp(case.id),
                                       str(data_dir))
    yield futures
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_error(case, outcomes):
  result = outcomes[case.id].result()
  proc = result.proc
  context = (f"\ncommand: {' '.join(result.argv[1:])}\nexit code: {proc.returncode}\n"
             f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
  assert "Traceback" not in proc.stdout + proc.stderr, context
  assert proc.returncode == 2, context
  lines = _message_lines(proc.stderr)
  assert len(lines) == 1, f"expected exactly one message line, got {lines}{context}"
  assert lines[0].startswith("error: "), context
  for word in case.keywords:
    assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}{context}"
  after = _snapshot(result.out_dir)
  changed = sorted(set(after) ^ set(result.before)
                   | {p for p in after if p in result.before and after[p] != result.before[p]})
  assert not changed, f"files written although the input was rejected: {changed}{context}"
  # Show the message in -rA / -s output, for the catalogue of messages.
  print(f"{case.id}: {lines[0]}")
