"""Latency of `tff_dpmed.serve` over gRPC and REST, batch 1 and batch 32.

  python -m benchmarks.bench_serving [--requests=300] [--warmup=30] [--model=cnn]

Exports a fresh model (random weights: latency does not depend on them) for
PneumoniaMNIST's 28x28x1 images, starts the server as a subprocess on free
loopback ports, and times sequential Predict calls from one client thread,
end to end (request encoding, transport, inference, response decoding).
uint8 images go to `serving_default`, PNG files to `predict_image_bytes`.
Prints a markdown table of p50/p99 latency and images per second.
"""

import gc
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import portpicker
import tensorflow as tf

from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.models import build_model
from tff_dpmed.serving import client as client_lib
from tff_dpmed.serving import export

_REQUESTS = flags.DEFINE_integer("requests", 300, "Timed requests per case.")
_WARMUP = flags.DEFINE_integer("warmup", 30, "Untimed requests before each case.")
_MODEL = flags.DEFINE_string("model", "cnn", "Model architecture to serve.")
_PNG = flags.DEFINE_boolean("png", True,
                            "Also time PNG files through predict_image_bytes.")

INFO = DatasetInfo("pneumoniamnist", "binary-class", ("normal", "pneumonia"),
                   (28, 28, 1))
MODEL_NAME = "bench"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_server(model_dir: str, log_path: str):
  grpc_port, rest_port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
  log = open(log_path, "wb")
  proc = subprocess.Popen(
      [sys.executable, "-m", "tff_dpmed.serve", f"--model_base_path={model_dir}",
       f"--model_name={MODEL_NAME}", f"--port={grpc_port}",
       f"--rest_api_port={rest_port}"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=log)
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and proc.poll() is None:
    if select.select([proc.stdout], [], [], 0.5)[0]:
      if proc.stdout.readline().startswith(b"serving "):
        return proc, log, grpc_port, rest_port
  proc.kill()
  proc.wait()
  raise SystemExit(f"server did not start; see {log_path}")


def _time_case(client, inputs: dict, signature: str, requests: int,
               warmup: int) -> np.ndarray:
  for _ in range(warmup):
    client.predict(MODEL_NAME, inputs, signature_name=signature)
  times = np.empty(requests)
  for i in range(requests):
    start = time.perf_counter()
    client.predict(MODEL_NAME, inputs, signature_name=signature)
    times[i] = time.perf_counter() - start
  return times


def main(argv):
  del argv
  rng = np.random.RandomState(0)
  with tempfile.TemporaryDirectory(prefix="bench_serving-") as tmp:
    model = build_model(_MODEL.value, INFO, seed=0)
    export.export_saved_model(model, INFO, tmp, MODEL_NAME, {"benchmark": True})
    log_path = os.path.join(tmp, "server.log")
    proc, log, grpc_port, rest_port = _start_server(
        os.path.join(tmp, MODEL_NAME), log_path)
    clients = {
        "gRPC": client_lib.GrpcClient(f"127.0.0.1:{grpc_port}"),
        "REST": client_lib.RestClient(f"127.0.0.1:{rest_port}"),
    }
    # This process holds TF's ~500k objects too: keep full GC passes over
    # them out of the client-side timings (the server does the same).
    gc.freeze()
    rows = []
    try:
      for batch in (1, 32):
        images = rng.randint(0, 256, (batch, *INFO.image_shape)).astype(np.uint8)
        cases = [("uint8", export.SIGNATURE_IMAGES, {export.INPUT_IMAGES: images})]
        if _PNG.value:
          pngs = [tf.io.encode_png(i).numpy() for i in images]
          cases.append(("PNG", export.SIGNATURE_IMAGE_BYTES,
                        {export.INPUT_IMAGE_BYTES: pngs}))
        for input_kind, signature, inputs in cases:
          for protocol, client in clients.items():
            times = _time_case(client, inputs, signature, _REQUESTS.value,
                               _WARMUP.value)
            p50, p99 = np.percentile(times, [50, 99]) * 1000
            rows.append((protocol, input_kind, batch, p50, p99,
                         batch / times.mean()))
    finally:
      for client in clients.values():
        client.close()
      proc.send_signal(signal.SIGTERM)
      code = proc.wait(timeout=60)
      proc.stdout.close()
      log.close()
    print(f"\n{_MODEL.value}, {'x'.join(map(str, INFO.image_shape))} images, "
          f"{_REQUESTS.value} sequential requests per row after "
          f"{_WARMUP.value} warm-up, {os.cpu_count()} CPUs; server exit code "
          f"{code}\n")
    print("| protocol | input | batch | p50 ms | p99 ms | images/s |")
    print("|---|---|---:|---:|---:|---:|")
    for protocol, input_kind, batch, p50, p99, rate in rows:
      print(f"| {protocol} | {input_kind} | {batch} | {p50:.2f} | {p99:.2f} | "
            f"{rate:,.0f} |")


if __name__ == "__main__":
  app.run(main)
