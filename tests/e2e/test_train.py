"""End-to-end runs of `python -m tff_dpmed.train`: every DP mode, outputs, kill and resume.

Each run is a subprocess, as a user runs it, so these tests also prove that no
TFF worker outlives the trainer. Runs are tiny (BreastMNIST, a few clients,
2-4 rounds); most of their time is TFF's one-off tracing and compiling.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tests.conftest import REPO_ROOT
from tff_dpmed.federated import context
from tff_dpmed.program import artifacts
from tff_dpmed.program.metrics_log import COLUMNS

_COMMON = ["--dataset=breastmnist", "--num_clients=6", "--clients_per_round=3",
           "--client_batch_size=32", "--rounds_per_eval=1", "--progress=false"]


def _train_cmd(data_dir, out_dir, name, *flags):
  return [sys.executable, "-m", "tff_dpmed.train", f"--data_dir={data_dir}",
          f"--output_dir={out_dir}", f"--experiment_name={name}", *_COMMON, *flags]


def _stray_workers(timeout_s: float = 10.0) -> list:
  """Orphaned workers: a trainer that exits and leaves its worker leaves it to PID 1.

  (Not "every worker on the machine": this test session keeps its own runtime,
  and other jobs may run theirs.)
  """
  deadline = time.monotonic() + timeout_s
  while True:
    stray = []
    for pid in context.worker_pids():
      try:
        proc = psutil.Process(pid)
        if proc.ppid() == 1 and proc.status() != psutil.STATUS_ZOMBIE:
          stray.append(pid)
      except psutil.NoSuchProcess:
        pass
    if not stray or time.monotonic() > deadline:
      return stray
    time.sleep(0.1)


def _run(cmd, timeout=600):
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
  return proc


def _rows(run_dir):
  with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _summary(run_dir):
  with open(os.path.join(run_dir, "summary.json")) as f:
    return _strict_json(f.read())


def _ledger(run_dir):
  with open(os.path.join(run_dir, "privacy_ledger.json")) as f:
    return json.load(f)["ledger"]


def _strict_json(text: str):
  def reject(name):
    raise AssertionError(f"non-standard JSON constant {name}")
  return json.loads(text, parse_constant=reject)


# Poisson cases are seeded: with 6 clients at q=0.5 an unseeded round is empty
# about 3% of the time, which leaves that round's train loss blank. Seed 3
# samples 4 and 4 clients.
@pytest.mark.parametrize("mode_flags", [
    ("--dp_mode=none", "--audit", "--seed=3"),
    ("--dp_mode=central", "--noise_multiplier=1.1", "--clip_mode=adaptive", "--seed=3"),
    ("--dp_mode=central", "--noise_multiplier=1.1", "--clip_mode=fixed", "--clip=1.0",
     "--sampling=fixed"),
    ("--dp_mode=local", "--noise_multiplier=1.1", "--clip_mode=fixed", "--clip=1.0",
     "--sampling=all", "--clients_per_round=6"),
], ids=["none", "central-adaptive", "central-fixed", "local"])
def test_two_round_run_writes_every_output(mode_flags, data_dir, tmp_path):
  run_dir = tmp_path / "run"
  proc = _run(_train_cmd(data_dir, tmp_path, "run", "--rounds=2", *mode_flags))

  assert _stray_workers() == []
  rows = _rows(run_dir)
  assert [int(r["round"]) for r in rows] == [1, 2]
  assert tuple(rows[0].keys()) == COLUMNS
  dp_mode = mode_flags[0].split("=")[1]
  if dp_mode == "none":
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
  else:
    # Per-client train values, cohort sizes and timings are outside epsilon: not released.
    for column in ("train_loss", "train_accuracy", "clients", "round_seconds"):
      assert {r[column] for r in rows} == {""}, column
  assert all(0 <= float(r["val_auc"]) <= 1 for r in rows)
  summary = _summary(run_dir)
  assert 0 <= summary["test_auc"] <= 1 and 0 <= summary["test_accuracy"] <= 1
  privacy = summary["privacy"]
  assert privacy["dp_mode"] == dp_mode
  if dp_mode == "none":
    assert privacy["epsilon"] is None and rows[-1]["epsilon"] == ""
    audit = summary["audit"]  # --audit: membership inference on the final model.
    assert 0 <= audit["attack_auc"] <= 1 and 0 <= audit["attacker_advantage"] <= 1
    assert audit["num_members"] > 0 and audit["num_nonmembers"] > 0
    assert "membership-inference audit: attack AUC" in proc.stdout
    assert rows[-1]["clip_norm"] == ""
  else:
    assert privacy["epsilon"] > 0 and math.isfinite(privacy["epsilon"])
    # The csv's last epsilon is the reported one, and epsilon grows with rounds.
    assert float(rows[-1]["epsilon"]) == pytest.approx(privacy["epsilon"])
    assert float(rows[0]["epsilon"]) < float(rows[1]["epsilon"])
    assert privacy["privacy_unit"] == "client"
    assert privacy["accountant"] in ("rdp", "pld")
    assert float(rows[0]["clip_norm"]) > 0
  assert f"epsilon" in proc.stdout and "test AUC" in proc.stdout
  assert _strict_json(proc.stdout.strip().splitlines()[-1])["test_auc"] == summary["test_auc"]
  _strict_json((run_dir / "summary.json").read_text())
  # TensorBoard curves and the TF Serving export.
  tb = run_dir / "tensorboard"
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
  assert (run_dir / "saved_model" / "cnn" / "1" / "saved_model.pb").exists()
  assert (run_dir / "saved_model" / "models.config").exists()


def test_example_level_run_reports_both_guarantees(data_dir, tmp_path):
  # DP-SGD in the clients (patient level) and the server's client-level layer.
  from tff_dpmed.privacy import accounting
  from tff_dpmed.privacy.spec import DPSpec
  run_dir = tmp_path / "run"
  proc = _run(_train_cmd(data_dir, tmp_path, "run", "--rounds=2", "--dp_mode=example",
                         "--clip_mode=fixed", "--clip=1.0", "--noise_multiplier=1.5",
                         "--client_learning_rate=0.5", "--client_dp=central",
                         "--server_noise_multiplier=1.0", "--server_clip=0.5"))
  summary = _summary(run_dir)
  privacy = summary["privacy"]
  assert privacy["privacy_unit"] == "example" and privacy["dp_mode"] == "example"
  sizes = summary["config"]["client_sizes"]
  assert len(sizes) == 6 and sum(sizes) == 546  # BreastMNIST train, split over 6 hospitals.
  spec = DPSpec(mode="example", noise_multiplier=1.5, num_clients=6, clients_per_round=3,
                clip_mode="fixed", clip=1.0, batch_size=32, client_sizes=tuple(sizes),
                client_dp="central", server_noise_multiplier=1.0, server_clip=0.5)
  assert privacy["epsilon"] == pytest.approx(accounting.epsilon_for_rounds(spec, 2), rel=1e-9)
  client = privacy["client_level"]
  assert client["privacy_unit"] == "client" and client["clip"] == 0.5
  assert client["epsilon"] == pytest.approx(
      accounting.epsilon_for_rounds(spec.client_level_spec(), 2), rel=1e-9)
  rows = _rows(run_dir)
  assert float(rows[-1]["epsilon"]) == pytest.approx(privacy["epsilon"])
  assert float(rows[-1]["client_epsilon"]) == pytest.approx(client["epsilon"])
  for column in ("train_loss", "train_accuracy", "clients", "round_seconds"):
    assert {r[column] for r in rows} == {""}, column
  assert "client-level (server) epsilon" in proc.stdout
  assert _strict_json(proc.stdout.strip().splitlines()[-1])["privacy_unit"] == "example"
  # No seed leaves the run in the export (the noise would be predictable).
  assert (run_dir / "saved_model" / "cnn" / "1" / "saved_model.pb").exists()


def _wait_for_rows(run_dir, n, proc, timeout_s=300):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    assert proc.poll() is None, "the run ended before it could be killed"
    path = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(path) and len(_rows(run_dir)) >= n:
      return
    time.sleep(0.2)
  raise AssertionError(f"no {n} rounds within {timeout_s}s")


def test_killed_run_resumes_to_the_uninterrupted_result(data_dir, tmp_path):
  # Seeded local DP is fully deterministic (seeded sampling, init and client
  # noise), so the resumed run must match the uninterrupted one exactly, and
  # its epsilon depends on the restored sampler and ledger.
  flags = ["--rounds=4", "--rounds_per_checkpoint=1", "--seed=7", "--dp_mode=local",
           "--noise_multiplier=2.0", "--clip_mode=fixed", "--clip=1.0",
           "--insecure_reproducible_sampling"]
  _run(_train_cmd(data_dir, tmp_path, "straight", *flags))
  straight = tmp_path / "straight"

  cmd = _train_cmd(data_dir, tmp_path, "killed", *flags)
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    _wait_for_rows(tmp_path / "killed", 2, proc)
    workers = [c for c in psutil.Process(proc.pid).children()
               if "worker_binary" in " ".join(c.cmdline())]
    assert len(workers) == 1
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # SIGKILL gives the trainer no chance to clean up: the kernel kills its worker.
  psutil.wait_procs(workers, timeout=10)
  assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
  assert not (tmp_path / "killed" / "summary.json").exists()

  resumed = _run(cmd)
  assert "resuming" in resumed.stderr
  killed = tmp_path / "killed"
  assert [int(r["round"]) for r in _rows(killed)] == [1, 2, 3, 4]
  a, b = _summary(straight), _summary(killed)
  # A round that ran after the last checkpoint and before the kill ran twice: both
  # count (test_rounds_rerun_after_a_crash_are_accounted checks the exact figure).
  # Local DP is accounted per client, by its participations: a rerun round adds one
  # to each client it samples, so epsilon grows exactly when the worst client's
  # count does (the restored seeded sampler may rerun a round without it).
  worst = {run: max(c for _, c in _ledger(tmp_path / run)["participation"])
           for run in ("straight", "killed")}
  assert b["privacy"]["rounds_accounted"] >= 4
  if b["privacy"]["rounds_accounted"] == 4:
    assert worst["killed"] == worst["straight"]
  if worst["killed"] == worst["straight"]:
    assert b["privacy"]["epsilon"] == pytest.approx(a["privacy"]["epsilon"], rel=1e-9)
  else:
    assert worst["killed"] > worst["straight"]
    assert b["privacy"]["epsilon"] > a["privacy"]["epsilon"]
  for wa, wb in zip(artifacts.load_final_weights(straight), artifacts.load_final_weights(killed)):
    np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
  if b["privacy"]["rounds_accounted"] == 4:
    assert [r["epsilon"] for r in _rows(killed)] == [r["epsilon"] for r in _rows(straight)]
  assert _stray_workers() == []


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(data_dir, tmp_path):
  flags = ["--rounds_per_checkpoint=1", "--seed=3", "--dp_mode=none"]
  _run(_train_cmd(data_dir, tmp_path, "run", "--rounds=2", *flags))
  checkpoints = tmp_path / "run" / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == ["round_1", "round_2"]
  for root, _, files in os.walk(checkpoints / "round_2"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"corrupt")

  proc = _run(_train_cmd(data_dir, tmp_path, "run", "--rounds=3", *flags))
  assert "round_2 is unreadable" in proc.stderr
  assert "after round 1" in proc.stderr
  assert [int(r["round"]) for r in _rows(tmp_path / "run")] == [1, 2, 3]


def test_max_epsilon_stops_before_the_round_that_would_exceed_it(data_dir, tmp_path):
  from tff_dpmed.privacy import accounting
  from tff_dpmed.privacy.spec import DPSpec
  setting = DPSpec(mode="central", noise_multiplier=1.1, num_clients=6, clients_per_round=3,
                   sampling="poisson", accountant="auto", clip_mode="fixed", clip=1.0)
  eps2, eps3 = (accounting.epsilon_for_rounds(setting, r) for r in (2, 3))
  budget = (eps2 + eps3) / 2
  _run(_train_cmd(data_dir, tmp_path, "run", "--rounds=5", "--dp_mode=central",
                  "--noise_multiplier=1.1", "--clip_mode=fixed", "--clip=1.0",
                  f"--max_epsilon={budget}"))
  summary = _summary(tmp_path / "run")
  assert summary["rounds_completed"] == 2
  assert summary["stopped_by_max_epsilon"] is True
  assert summary["privacy"]["epsilon"] == pytest.approx(eps2)
  assert summary["privacy"]["epsilon"] <= budget
  assert (tmp_path / "run" / "saved_model" / "cnn" / "1").exists()


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(data_dir, tmp_path):
  flags = ["--rounds_per_checkpoint=1", "--seed=3", "--dp_mode=none"]
  _run(_train_cmd(data_dir, tmp_path, "run", "--rounds=1", *flags))
  for root, _, files in os.walk(tmp_path / "run" / "checkpoints"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"corrupt")
  rows_before = _rows(tmp_path / "run")

  proc = subprocess.run(_train_cmd(data_dir, tmp_path, "run", "--rounds=2", *flags),
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "--restart" in errors[0]
  assert "Traceback" not in proc.stderr
  # Nothing was rewritten: starting over silently would reset metrics and the ledger.
  assert _rows(tmp_path / "run") == rows_before
  # The first rerun moved the unreadable checkpoints aside; a second one still refuses,
  # because the folder's ledger says rounds were released.
  again = subprocess.run(_train_cmd(data_dir, tmp_path, "run", "--rounds=2", *flags),
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 2, again.stderr[-2000:]
  errors = [l for l in again.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "released 1 rounds" in errors[0] and "--restart" in errors[0]
  assert _rows(tmp_path / "run") == rows_before
  _run(_train_cmd(data_dir, tmp_path, "run", "--rounds=2", "--restart", *flags))
  assert [int(r["round"]) for r in _rows(tmp_path / "run")] == [1, 2]


def _error_line(proc) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


def test_resume_refuses_other_privacy_settings_or_data(data_dir, tmp_path):
  local = ["--dp_mode=local", "--clip_mode=fixed", "--clip=1.0", "--rounds_per_checkpoint=1"]
  _run(_train_cmd(data_dir, tmp_path, "run", "--rounds=1", "--noise_multiplier=5", *local))
  run_dir = tmp_path / "run"
  ledger_before = (run_dir / "privacy_ledger.json").read_bytes()
  # The reproduction: config.json deleted, then resumed with less noise.
  os.remove(run_dir / "config.json")
  message = _error_line(subprocess.run(
      _train_cmd(data_dir, tmp_path, "run", "--rounds=2", "--noise_multiplier=0.5", *local),
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600))
  assert "other privacy settings" in message and "noise_multiplier" in message
  assert (run_dir / "privacy_ledger.json").read_bytes() == ledger_before
  # Other data: the same file name with one changed pixel.
  other = tmp_path / "other_data"
  other.mkdir()
  with np.load(os.path.join(data_dir, "breastmnist.npz"), allow_pickle=False) as f:
    arrays = {k: f[k].copy() for k in f.files}
  arrays["train_images"][0, 0, 0] ^= 1
  np.savez(other / "breastmnist.npz", **arrays)
  cmd = _train_cmd(data_dir, tmp_path, "run", "--rounds=2", "--noise_multiplier=5", *local)
  cmd[cmd.index(f"--data_dir={data_dir}")] = f"--data_dir={other}"
  _run(_train_cmd(data_dir, tmp_path, "run", "--rounds=1", "--noise_multiplier=5", *local))
  message = _error_line(subprocess.run(cmd + ["--download=false"], cwd=REPO_ROOT,
                                       capture_output=True, text=True, timeout=600))
  assert "other data" in message and "--restart" in message


@pytest.mark.parametrize("dp_mode", ["central", "example"])
def test_rounds_rerun_after_a_crash_are_accounted(data_dir, tmp_path, dp_mode):
  # Every round executed counts, including those after the last checkpoint that a
  # resumed run executes again with fresh noise.
  from tff_dpmed.privacy import accounting
  from tff_dpmed.privacy.spec import DPSpec
  flags = ["--rounds=4", "--rounds_per_checkpoint=2", f"--dp_mode={dp_mode}",
           "--noise_multiplier=2.0", "--clip_mode=fixed", "--clip=1.0", "--sampling=all",
           "--clients_per_round=6"]
  cmd = _train_cmd(data_dir, tmp_path, "run", *flags)
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  run_dir = tmp_path / "run"
  try:
    _wait_for_rows(run_dir, 3, proc)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with open(run_dir / "privacy_ledger.json") as f:
    executed = json.load(f)["ledger"]["rounds"]
  assert executed >= 3
  resumed = _run(cmd)
  assert "stay accounted" in resumed.stderr
  # DP-SGD's per-client data files (private to the run folder) are gone once it ends.
  assert not (run_dir / "client_data.tmp").exists()
  summary = _summary(run_dir)
  accounted = executed + (4 - 2)  # Rounds 3 and 4 run again from the round-2 checkpoint.
  assert summary["privacy"]["rounds_accounted"] == accounted
  example = dict(batch_size=32, client_sizes=tuple(summary["config"]["client_sizes"]))
  spec = DPSpec(mode=dp_mode, noise_multiplier=2.0, num_clients=6, clients_per_round=6,
                sampling="all", clip_mode="fixed", clip=1.0,
                **(example if dp_mode == "example" else {}))
  assert summary["privacy"]["epsilon"] == pytest.approx(
      accounting.epsilon_for_rounds(spec, accounted), rel=1e-9)
  assert float(_rows(run_dir)[-1]["epsilon"]) == pytest.approx(summary["privacy"]["epsilon"])
  # TensorBoard shows the same rounds as metrics.csv: rebuilt from it on resume.
  from tensorboard.backend.event_processing import event_accumulator
  tb = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
  tb.Reload()
  steps = sorted({e.step for tag in tb.Tags()["tensors"] for e in tb.Tensors(tag)})
  assert steps == [1, 2, 3, 4]


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_runs(data_dir, tmp_path):
  flags = ["--rounds=40", "--dp_mode=none", "--seed=3"]
  first = subprocess.Popen(_train_cmd(data_dir, tmp_path, "run", *flags), cwd=REPO_ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_for_rows(tmp_path / "run", 1, first)
    config = tmp_path / "run" / "config.json"  # The first run keeps writing its ledger.
    before = config.read_bytes()
    second = subprocess.run(_train_cmd(data_dir, tmp_path, "run", *flags), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    message = _error_line(second)
    assert "another run is using" in message
    assert config.read_bytes() == before
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
  # The first run's checkpoint writes completed; the refused run left no temporary ones.
  assert not list((tmp_path / "run" / "checkpoints").glob("*temp*"))
  assert _stray_workers() == []


def test_patients_as_clients_train_in_packs_with_the_unpacked_epsilon(data_dir, tmp_path):
  # Packing changes how clients reach TFF, not the release: the epsilon is the
  # central mechanism's for Poisson-sampled one-example clients.
  from tff_dpmed.privacy import accounting
  from tff_dpmed.privacy.spec import DPSpec
  flags = ["--partition=per_example", "--num_clients=546", "--clients_per_round=100",
           "--dp_mode=central", "--clip_mode=fixed", "--clip=1", "--noise_multiplier=1.0",
           "--rounds=3", "--client_batch_size=1", "--model=scatter_linear"]
  proc = _run(_train_cmd(data_dir, tmp_path, "packed", *flags))
  assert "client_packing: each round's sampled clients go to TFF in packs" in proc.stderr
  summary = _summary(tmp_path / "packed")
  spec = DPSpec(mode="central", noise_multiplier=1.0, num_clients=546, clients_per_round=100,
                clip_mode="fixed", clip=1.0)
  assert summary["privacy"]["rounds_accounted"] == 3
  assert summary["privacy"]["epsilon"] == pytest.approx(accounting.epsilon_for_rounds(spec, 3),
                                                        rel=1e-9)
  assert summary["privacy"]["privacy_unit"] == "client"
  assert (tmp_path / "packed" / "saved_model" / "scatter_linear" / "1" / "saved_model.pb").exists()
  refused = subprocess.run(_train_cmd(data_dir, tmp_path, "refused", "--client_packing=on",
                                      "--dp_mode=central", "--noise_multiplier=1"),
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert refused.returncode == 2
  assert "--client_packing=on cannot pack this run" in _error_line(refused)
  assert not (tmp_path / "refused").exists()
