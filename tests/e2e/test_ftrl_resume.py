"""DP-FTRL (`--dp_mode=central_tree`) through the real CLI: a stop in a round's
evaluation, the resume, the accounting of the re-run round, and checkpoints that
(holding the tree's noise seeds) are owner-only and gone when the run ends."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.run_outputs import checkpoint_rounds, read_rows
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy.spec import DPSpec

pytestmark = pytest.mark.e2e

ROUNDS, Z, CLIENTS = 4, 3.0, 4
_FLAGS = ["--dataset=breastmnist", f"--num_clients={CLIENTS}", f"--clients_per_round={CLIENTS}",
          "--sampling=all", "--dp_mode=central_tree", "--clip_mode=fixed", "--clip=0.1",
          f"--noise_multiplier={Z}", f"--rounds={ROUNDS}", "--rounds_per_eval=1",
          "--rounds_per_checkpoint=100", "--client_batch_size=32", "--progress=false"]

# The real CLI, with SIGTERM sent to itself during round 3's evaluation: round 3
# has been executed (and accounted) but not released.
_HOOK = r'''
import os, signal, sys
from tff_dpmed import train
from tff_dpmed.program import loop
run_dir = sys.argv[1]
sys.argv = [sys.argv[0]] + sys.argv[2:]
state = {"n": 0}
def after_evaluate(round_num):
  state["n"] += 1
  if state["n"] == 3:
    mode = os.stat(os.path.join(run_dir, "checkpoints")).st_mode & 0o777
    print(f"checkpoints mode {mode:o}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
train.run(hooks=loop.RoundHooks(after_evaluate=after_evaluate))
'''


def _run(args, timeout=900):
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=timeout)


def test_stop_and_resume_account_the_rerun_round_and_leave_no_seeds(tmp_path, data_dir):
  flags = [*_FLAGS, f"--data_dir={data_dir}", f"--output_dir={tmp_path}",
           "--experiment_name=ftrl"]
  run_dir = tmp_path / "ftrl"
  hook = tmp_path / "hook.py"
  hook.write_text(_HOOK)
  stopped = _run([str(hook), str(run_dir), *flags])
  assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
  assert "checkpoints mode 700" in stopped.stderr
  # Every released round is checkpointed (whatever --rounds_per_checkpoint says),
  # before its metrics row: rounds 1 and 2; round 3 released nothing.
  assert checkpoint_rounds(run_dir)[-1] == 2
  assert [int(r["round"]) for r in read_rows(run_dir)] == [1, 2]
  with open(run_dir / "privacy_ledger.json") as f:
    assert json.load(f)["ledger"]["rounds"] == 3  # Executed, so accounted.

  resumed = _run(["-m", "tff_dpmed.train", *flags])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming" in resumed.stderr
  assert "checkpoints deleted" in resumed.stderr
  with open(run_dir / "summary.json") as f:
    summary = json.load(f)
  spec = DPSpec(mode="central_tree", noise_multiplier=Z, num_clients=CLIENTS,
                clients_per_round=CLIENTS, sampling="all", clip_mode="fixed", clip=0.1)
  # Round 3 ran twice: the tree is accounted with 5 leaves, not 4.
  assert summary["privacy"]["rounds_accounted"] == ROUNDS + 1
  assert summary["privacy"]["epsilon"] == pytest.approx(
      accounting.epsilon_for_rounds(spec, ROUNDS + 1), rel=1e-9)
  assert summary["privacy"]["epsilon"] > accounting.epsilon_for_rounds(spec, ROUNDS)
  assert checkpoint_rounds(run_dir) == []
  assert stat.S_IMODE(os.stat(run_dir / "checkpoints").st_mode) == 0o700
  assert [int(r["round"]) for r in read_rows(run_dir)] == [1, 2, 3, 4]
