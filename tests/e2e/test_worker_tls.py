"""`python -m tff_dpmed.worker` over mutual TLS, with certificates made here (issue 17).

One TLS worker on 127.0.0.1 serves the module: a trainer with the client
certificate trains on it; clients without a certificate, with one from
another CA, or in plaintext are refused; its binary is not on the network.
"""

import datetime
import ipaddress
import os
import re
import signal
import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
import grpc
import numpy as np
import portpicker
import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.run_outputs import read_rows
from tests.e2e.test_executor_isolation import exposed_sockets, listening_sockets
from tests.e2e.test_train_bad_inputs import _message_lines
from tff_dpmed.federated import context
from tff_dpmed.federated import tls_proxy


def _name(common_name: str) -> x509.Name:
  return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer=None, *, ca=False, hosts=()):
  """A key and a certificate for `subject`, signed by `issuer` (key, cert) or self-signed."""
  key = ec.generate_private_key(ec.SECP256R1())
  issuer_key, issuer_cert = issuer or (key, None)
  now = datetime.datetime.now(datetime.timezone.utc)
  builder = (x509.CertificateBuilder()
             .subject_name(_name(subject))
             .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
             .public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
  if hosts:
    builder = builder.add_extension(x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h)
         for h in hosts]), critical=False)
  return key, builder.sign(issuer_key, hashes.SHA256())


def _write(folder, name, key, cert) -> tuple[str, str]:
  key_path, cert_path = os.path.join(folder, f"{name}.key"), os.path.join(folder, f"{name}.pem")
  with open(key_path, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  with open(cert_path, "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("pki"))
  ca = _issue("tff_dpmed test CA", ca=True)
  rogue_ca = _issue("someone else's CA", ca=True)
  paths = {"ca": _write(folder, "ca", *ca)[0]}
  paths["worker_cert"], paths["worker_key"] = _write(
      folder, "worker", *_issue("worker", ca, hosts=("127.0.0.1", "localhost")))
  paths["client_cert"], paths["client_key"] = _write(folder, "trainer", *_issue("trainer", ca))
  paths["rogue_cert"], paths["rogue_key"] = _write(folder, "rogue",
                                                   *_issue("trainer", rogue_ca))
  return paths


def _worker_cmd(port, *flags):
  return [sys.executable, "-m", "tff_dpmed.worker", f"--port={port}", *flags]


@pytest.fixture(scope="module")
def tls_worker(pki, tmp_path_factory):
  port = portpicker.pick_unused_port()
  log = tmp_path_factory.mktemp("tls_worker") / "worker.log"
  proc = subprocess.Popen(
      _worker_cmd(port, f"--tls_cert={pki['worker_cert']}", f"--tls_key={pki['worker_key']}",
                  f"--tls_client_ca={pki['ca']}", f"--log_file={log}"),
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ready = proc.stdout.readline()
  if not ready.startswith("ready:"):
    proc.kill()
    raise AssertionError(f"TLS worker did not start: {ready!r} {proc.stderr.read()[-2000:]}")
  binary_pid = int(re.search(r"worker_binary pid (\d+)", ready).group(1))
  yield {"proc": proc, "port": port, "address": f"127.0.0.1:{port}", "ready": ready,
         "binary_pid": binary_pid}
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0 and "stopped: SIGTERM" in out
  assert not psutil.pid_exists(binary_pid) or (
      psutil.Process(binary_pid).status() == psutil.STATUS_ZOMBIE)


def test_proxy_forwards_exactly_tffs_executor_methods():
  from tensorflow_federated.proto.v0 import executor_pb2
  service = executor_pb2.DESCRIPTOR.services_by_name["ExecutorGroup"]
  assert service.full_name == tls_proxy.EXECUTOR_SERVICE
  assert {m.name: (m.client_streaming, m.server_streaming) for m in service.methods} == (
      tls_proxy.EXECUTOR_METHODS)


def test_tls_worker_binary_is_off_the_network(tls_worker):
  assert "mutual TLS" in tls_worker["ready"]
  wrapper = tls_worker["proc"].pid
  # Only the proxy in the wrapper listens on this host: on the TLS port.
  assert [(a, p) for _, a, p in exposed_sockets([wrapper])] == [("::", tls_worker["port"])]
  binary = tls_worker["binary_pid"]
  assert listening_sockets([binary]) and exposed_sockets([binary]) == []


def _credentials(pki, cert="client_cert", key="client_key"):
  return context.tls_channel_credentials(pki["ca"], cert and pki[cert], key and pki[key])


def test_computation_runs_over_mutual_tls(tls_worker, pki):
  import tensorflow_federated as tff

  @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
  def total(values):
    return tff.federated_sum(values)

  with context.remote_runtime([tls_worker["address"]], credentials=_credentials(pki)):
    assert total([1.0, 2.0, 3.5]) == pytest.approx(6.5)


@pytest.mark.parametrize("client", ["no certificate", "another CA's certificate", "plaintext"])
def test_client_without_a_trusted_certificate_is_refused(tls_worker, pki, client):
  credentials = {"no certificate": lambda: _credentials(pki, None, None),
                 "another CA's certificate": lambda: _credentials(pki, "rogue_cert", "rogue_key"),
                 "plaintext": lambda: None}[client]()
  with pytest.raises(context.WorkerError, match=re.escape(tls_worker["address"])):
    context.check_reachable([tls_worker["address"]], timeout_s=3, credentials=credentials)
  # Not even one executor RPC gets through.
  channel = (grpc.secure_channel(tls_worker["address"], credentials) if credentials
             else grpc.insecure_channel(tls_worker["address"]))
  with channel:
    get_executor = channel.unary_unary(
        f"/{tls_proxy.EXECUTOR_SERVICE}/GetExecutor")
    with pytest.raises(grpc.RpcError) as e:
      get_executor(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_trainer_trains_over_mutual_tls(tls_worker, pki, data_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "tff_dpmed.train", f"--data_dir={data_dir}",
       f"--output_dir={tmp_path}", "--experiment_name=tls", "--dataset=breastmnist",
       "--num_clients=4", "--clients_per_round=2", "--client_batch_size=32", "--rounds=2",
       "--rounds_per_eval=1", "--dp_mode=none", "--seed=3", "--progress=false",
       "--executor=remote", f"--workers={tls_worker['address']}",
       f"--worker_tls_ca={pki['ca']}", f"--worker_tls_cert={pki['client_cert']}",
       f"--worker_tls_key={pki['client_key']}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  assert [int(r["round"]) for r in read_rows(str(tmp_path / "tls"))] == [1, 2]


def test_trainer_without_client_certificate_is_one_error_line(tls_worker, pki, data_dir,
                                                              tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "tff_dpmed.train", f"--data_dir={data_dir}",
       f"--output_dir={tmp_path / 'out'}", "--dataset=breastmnist", "--num_clients=4",
       "--clients_per_round=2", "--rounds=1", "--dp_mode=none", "--progress=false",
       "--executor=remote", f"--workers={tls_worker['address']}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  lines = _message_lines(result.stderr)
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert tls_worker["address"] in lines[0] and "--worker_tls_ca" in lines[0]
  assert not (tmp_path / "out").exists()


def test_worker_without_tls_flags_needs_insecure():
  result = subprocess.run(_worker_cmd(portpicker.pick_unused_port()), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
  lines = _message_lines(result.stderr)
  assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
  assert lines[0].startswith("error: ") and "--insecure" in lines[0] and "--tls_cert" in lines[0]
  assert "ready:" not in result.stdout


@pytest.mark.parametrize("flags, words", [
    (["--insecure", "--tls_cert=x"], ("--insecure", "--tls_*")),
    (["--tls_cert=x"], ("--tls_key", "--tls_client_ca")),
    (["--tls_cert=/nonexistent.pem", "--tls_key=/nonexistent.key", "--tls_client_ca=/x"],
     ("--tls_cert=/nonexistent.pem", "no such file")),
], ids=["insecure-and-tls", "partial-tls", "missing-file"])
def test_worker_tls_flags_are_validated(flags, words):
  result = subprocess.run(_worker_cmd(portpicker.pick_unused_port(), *flags), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
  lines = _message_lines(result.stderr)
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
  for word in words:
    assert word in lines[0]
