"""End-to-end tests of the privacy calculator, `python -m tff_dpmed.privacy`."""

import json
import pathlib
import subprocess
import sys

import pytest

from tff_dpmed.privacy import accounting
from tff_dpmed.privacy.spec import DPSpec
from tff_dpmed.privacy import calibration

REPO = pathlib.Path(__file__).resolve().parents[2]
PUBLISHED = ["--num_clients=3383", "--clients_per_round=120", "--rounds=100"]


def calculator(*args):
  return subprocess.run([sys.executable, "-m", "tff_dpmed.privacy", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)


def last_json(proc) -> dict:
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1], parse_constant=_reject_constant)


def _reject_constant(name):
  raise AssertionError(f"non-standard JSON constant {name} in the calculator's output")


def setting(**overrides):
  fields = dict(dp_mode="central", noise_multiplier=1.2, num_clients=3383, clients_per_round=120,
                sampling="poisson", delta=1e-5, accountant="auto", adaptive_clipping=True)
  fields.update(overrides)
  fields["clip_mode"] = "adaptive" if fields.pop("adaptive_clipping") else "fixed"
  return DPSpec.from_json(fields)


def test_epsilon_matches_library():
  proc = calculator(*PUBLISHED, "--noise_multiplier=1.2")
  out = last_json(proc)
  assert out["epsilon"] == accounting.epsilon_for_rounds(setting(), 100)
  assert out["epsilon"] == pytest.approx(1.71, abs=0.02)
  assert (out["delta"], out["noise_multiplier"], out["accountant"], out["sampling"]) == \
      (1e-5, 1.2, "pld", "poisson")
  assert out["privacy_unit"] == "client" and out["clip_mode"] == "adaptive"
  text = proc.stdout.lower()
  for words in ("privacy unit", "accountant: pld", "add/remove", "delta: 1e-05 (default"):
    assert words in text


def test_fixed_sampling_rdp_and_explicit_delta():
  out = last_json(calculator(*PUBLISHED, "--noise_multiplier=1.2", "--sampling=fixed",
                             "--clip_mode=fixed", "--delta=1e-6"))
  s = setting(sampling="fixed", adaptive_clipping=False, delta=1e-6)
  assert out["epsilon"] == accounting.epsilon_for_rounds(s, 100)
  assert (out["accountant"], out["neighboring_relation"]) == ("rdp", "replace_one")


def test_target_epsilon_prints_calibrated_noise():
  proc = calculator(*PUBLISHED, "--target_epsilon=2", "--accountant=rdp")
  out = last_json(proc)
  z = calibration.calibrate_noise_multiplier(setting(accountant="rdp"), 100, 2.0)
  assert out["noise_multiplier"] == z
  assert 0.98 * 2 <= out["epsilon"] <= 2
  assert f"noise_multiplier: {z:.6g}" in proc.stdout


def test_local_reports_worst_case():
  proc = calculator("--num_clients=50", "--rounds=20", "--dp_mode=local", "--clip_mode=fixed",
                    "--noise_multiplier=8")
  out = last_json(proc)
  s = setting(dp_mode="local", noise_multiplier=8.0, num_clients=50, clients_per_round=50,
              adaptive_clipping=False)
  assert out["epsilon"] == accounting.epsilon_for_rounds(s, 20)
  assert out["worst_case_participations"] == 20 and "worst case" in proc.stdout


def test_none_is_infinite():
  out = last_json(calculator("--num_clients=50", "--rounds=3", "--dp_mode=none"))
  assert out["epsilon"] is None and "no noise" in out["epsilon_note"]


@pytest.mark.parametrize("args, words", [
    (PUBLISHED + ["--sampling=all", "--clients_per_round=3383", "--target_epsilon=0.0001"],
     "not reachable"),
    (PUBLISHED + ["--noise_multiplier=1", "--target_epsilon=2"], "mutually exclusive"),
    (PUBLISHED + ["--noise_multiplier=1", "--delta=1.5"], "--delta=1.5"),
    (PUBLISHED, "--noise_multiplier"),
    (["--rounds=10", "--noise_multiplier=1"], "--num_clients is required"),
    (PUBLISHED + ["--noise_multiplier=1", "--sampling=fixed", "--accountant=pld"], "pld"),
    (PUBLISHED + ["--noise_multiplier=1", "--dp_mode=local"], "--clip_mode=fixed"),
    (PUBLISHED + ["--noise_multiplier=1", "--sampling=shuffle"], "--sampling"),
    (PUBLISHED + ["--noise_multiplier=nan"], "not finite"),
    (["--num_clients=3383", "--clients_per_round=120", "--rounds=1000000000",
      "--noise_multiplier=1"], "--rounds"),
    (["--num_clients=3383", "--clients_per_round=120", "--rounds=1000000000",
      "--target_epsilon=3"], "--rounds"),
    (PUBLISHED + ["--target_epsilon=1e300"], "too loose"),
    (PUBLISHED + ["--noise_multiplier=1e39"], "float32"),
])
def test_bad_input_exits_2_with_one_line(args, words):
  proc = calculator(*args)
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert words in lines[0]
  assert "Traceback" not in proc.stderr
