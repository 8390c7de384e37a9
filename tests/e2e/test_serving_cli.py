"""Serving and export without TFF, their one-line errors, and strict-JSON metadata.

Issue 11: importing the export or the server must not import TFF. Issue 17:
the mistakes below end with one `error: ...` line, exit 2, no traceback,
and nothing written; the exported metadata and the REST metadata answers are
strict JSON (no NaN/Infinity), checked with a parser that refuses them.
"""

import http.client
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.test_export import INFO, trained_model
from tff_dpmed.serving import export
from tff_dpmed.serving import export_metadata
from tff_dpmed.serving import model_store
from tff_dpmed.serving import rest


def strict_loads(text):
  """json.loads that fails on NaN, Infinity and -Infinity, as RFC 8259 does."""

  def refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")

  return json.loads(text, parse_constant=refuse)


def _python(*args, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc, *phrases):
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  for phrase in phrases:
    assert phrase in errors[0], errors[0]
  assert "Traceback" not in proc.stderr


# --- no TFF ------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["tff_dpmed.serving.export", "tff_dpmed.serve",
                                    "tff_dpmed.export", "tff_dpmed.predict"])
def test_importing_serving_code_does_not_import_tff(module):
  proc = _python("-c", f"import sys, {module}; "
                 "print('tensorflow_federated' in sys.modules)", timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "False"


def test_exporting_and_loading_do_not_import_tff(tmp_path):
  # The export's /255 used to come from data.client_data, which imports TFF.
  code = f"""
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from tests.e2e.test_export import trained_model
from tff_dpmed.serving import export, model_store
model, info, metadata = trained_model()
export.export_saved_model(model, info, {str(tmp_path)!r}, "m", metadata)
store = model_store.ModelStore("m", {str(tmp_path / "m")!r})
assert store.refresh() == [1]
print('tensorflow_federated' in sys.modules)
"""
  proc = _python("-c", code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "False"


# --- one-line errors ----------------------------------------------------------------


def test_serve_pointed_at_the_export_root_says_which_folder(tmp_path):
  model, info, metadata = trained_model()
  export.export_saved_model(model, info, str(tmp_path), "cnn", metadata)
  proc = _python("-m", "tff_dpmed.serve", f"--model_base_path={tmp_path}",
                 "--port=0", "--rest_api_port=0", timeout=120)
  _assert_one_line_error(proc, "is the export root", "models.config",
                         f"--model_base_path={tmp_path / 'cnn'}")
  # The root of an export that has no model folder yet: same answer.
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "models.config").write_text((tmp_path / "models.config").read_text())
  proc = _python("-m", "tff_dpmed.serve", f"--model_base_path={empty}",
                 "--port=0", "--rest_api_port=0", timeout=120)
  _assert_one_line_error(proc, "is the export root")


def _finished_run(run_dir, weights=None):
  run_dir.mkdir()
  summary = {"config": {"model": "cnn"}, "dataset": INFO.to_json(),
             "privacy": {"dp_mode": "none", "epsilon": None},
             "test_accuracy": 0.5, "test_auc": 0.5}
  (run_dir / "summary.json").write_text(json.dumps(summary))
  np.savez(run_dir / "final_weights.npz",
           *(weights or trained_model()[0].get_weights()))


@pytest.mark.parametrize("keep", [0.5, 0.05], ids=["half", "header-only"])
def test_export_cli_refuses_a_truncated_final_weights(tmp_path, keep):
  run_dir = tmp_path / "run"
  _finished_run(run_dir)
  path = run_dir / "final_weights.npz"
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  proc = _python("-m", "tff_dpmed.export", f"--run_dir={run_dir}")
  _assert_one_line_error(proc, "final_weights.npz", "truncated or corrupt")
  assert "model code has changed" not in proc.stderr
  assert not (run_dir / "saved_model").exists()


def test_export_cli_with_a_corrupt_models_config_writes_no_version(tmp_path):
  run_dir = tmp_path / "run"
  _finished_run(run_dir)
  base = run_dir / "saved_model"
  model, info, metadata = trained_model()
  export.export_saved_model(model, info, str(base), "cnn", metadata)
  (base / "models.config").write_text("model_config_list { config { name: ")
  proc = _python("-m", "tff_dpmed.export", f"--run_dir={run_dir}")
  _assert_one_line_error(proc, "models.config", "is not a valid TF Serving model "
                         "config", "nothing was exported")
  assert sorted(os.listdir(base / "cnn")) == ["1"]  # No 2, no temporary folder.


# --- strict JSON --------------------------------------------------------------------


_NON_FINITE = {"test_auc": float("nan"), "privacy": {"epsilon": math.inf},
               "per_round_auc": [0.5, np.float32("nan"), -math.inf],
               "note": "fine"}


def test_exported_metadata_is_strict_json_with_reasons(tmp_path):
  model, info, _ = trained_model()
  path = export.export_saved_model(model, info, str(tmp_path), "m", _NON_FINITE)
  with open(os.path.join(path, export.METADATA_DIR, export.METADATA_FILENAME)) as f:
    meta = strict_loads(f.read())
  assert meta["test_auc"] is None
  assert meta["test_auc_reason"].startswith("NaN: AUC is undefined")
  assert meta["privacy"]["epsilon"] is None
  assert "no finite differential-privacy guarantee" in meta["privacy"]["epsilon_reason"]
  assert meta["per_round_auc"] == [0.5, None, None]
  assert "[1] NaN" in meta["per_round_auc_reason"]
  assert "[2] -Infinity" in meta["per_round_auc_reason"]
  assert meta["note"] == "fine"


def test_rest_metadata_of_an_older_non_strict_export_is_strict(tmp_path):
  # Versions exported before this change hold NaN/Infinity in their file.
  model, info, _ = trained_model()
  path = export.export_saved_model(model, info, str(tmp_path), "m", {})
  meta_path = os.path.join(path, export.METADATA_DIR, export.METADATA_FILENAME)
  with open(meta_path) as f:
    doc = json.load(f)
  doc.update(_NON_FINITE)
  with open(meta_path, "w") as f:
    f.write(json.dumps(doc, default=float))  # Python writes NaN, Infinity.
  store = model_store.ModelStore("m", str(tmp_path / "m"))
  assert store.refresh() == [1]
  server = rest.RestServer(store, "127.0.0.1", 0, 1 << 20)
  server.start()
  try:
    answers = {}
    for path_ in ("/v1/models/m/metadata", "/v1/models/m"):
      conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
      conn.request("GET", path_)
      response = conn.getresponse()
      answers[path_] = strict_loads(response.read())
      conn.close()
      assert response.status == 200, answers[path_]
  finally:
    server.stop()
  meta = answers["/v1/models/m/metadata"]["metadata"]["tff_dpmed_metadata"]
  assert meta["test_auc"] is None and meta["test_auc_reason"].startswith("NaN")
  assert meta["privacy"]["epsilon"] is None
  # gRPC packs the same dict into a Struct: no NaN there either.
  _, fields = store.model_metadata("m", None, None)
  assert strict_loads(json.dumps(fields["tff_dpmed_metadata"])) == meta


def test_strict_json_keeps_finite_values_and_numpy_types():
  doc = {"a": np.float64(1.5), "b": np.arange(3), "c": [1, {"d": np.inf}], "e": None}
  assert export_metadata.strict_json(doc) == {
      "a": 1.5, "b": [0, 1, 2], "c": [1, {"d": None, "d_reason":
                                          "Infinity: not representable in strict JSON"}],
      "e": None}
