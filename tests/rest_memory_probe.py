"""Peak RSS of `tff_dpmed.serve` while it decodes large REST JSON bodies.

  python -m tests.rest_memory_probe [--body_mb=31] [--concurrent=1,4]

Not collected by pytest (a measurement, not a check): it exports a small
random-weight model, starts the server on free loopback ports with a request
cap above the body size, sends one body of ~`body_mb` MB of uint8 pixels as
row-format JSON integers (then `concurrent` of them at once), and samples the
server's RSS every 5 ms. Prints the idle RSS, the peak and the difference for
each case. Bounded: a handful of requests to 127.0.0.1, each with a timeout.
The batch is far above --max_batch_size, so the server decodes the whole
body and then refuses it with 400: what is measured is the decode, not
inference.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time

import portpicker
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.e2e.test_export import sample_images, trained_model  # pylint: disable=wrong-import-position
from tff_dpmed.serving import export  # pylint: disable=wrong-import-position

MODEL = "probe"


def _body(megabytes: float, defeat_fast_path: bool) -> bytes:
  per_image = len(json.dumps(sample_images(1).tolist()[0]))
  images = sample_images(max(1, int(megabytes * 1e6 / per_image)), seed=3)
  doc = {"instances": images.tolist()}
  if defeat_fast_path:
    # One ragged row makes the array not dense, so the whole body goes
    # through json.loads: the worst case, which only the in-flight byte
    # budget bounds.
    doc["instances"][-1][-1].pop()
  return json.dumps(doc).encode()


class _PeakSampler:
  def __init__(self, pid: int):
    self._process = psutil.Process(pid)
    self._stop = threading.Event()
    self.peak = self._process.memory_info().rss
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, self._process.memory_info().rss)

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return self.peak


def _post(port: int, body: bytes) -> int:
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  try:
    conn.request("POST", f"/v1/models/{MODEL}:predict", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status
  finally:
    conn.close()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--body_mb", type=float, default=31.0)
  parser.add_argument("--concurrent", default="1,4")
  parser.add_argument("--defeat_fast_path", action="store_true",
                      help="Make the body take json.loads' path (worst case).")
  parser.add_argument("--extra_flags", default="",
                      help="More serve flags, space-separated.")
  args = parser.parse_args()
  body = _body(args.body_mb, args.defeat_fast_path)
  with tempfile.TemporaryDirectory() as tmp:
    model, info, metadata = trained_model()
    export.export_saved_model(model, info, tmp, MODEL, metadata)
    grpc_port, rest_port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
    with open(os.path.join(tmp, "serve.log"), "wb") as log:
      proc = subprocess.Popen(
          [sys.executable, "-m", "tff_dpmed.serve",
           f"--model_base_path={os.path.join(tmp, MODEL)}", f"--port={grpc_port}",
           f"--rest_api_port={rest_port}",
           f"--max_request_bytes={len(body) + (1 << 20)}",
           *args.extra_flags.split()],
          cwd=REPO, stdout=subprocess.PIPE, stderr=log)
      try:
        deadline = time.monotonic() + 120
        while not (select.select([proc.stdout], [], [], 0.5)[0] and
                   proc.stdout.readline().startswith(b"serving ")):
          if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start")
        _post(rest_port, b'{"instances": [[0]]}')  # Warm the handler path up.
        print(f"body: {len(body) / 1e6:.1f} MB of row-format JSON integers")
        for n in (int(c) for c in args.concurrent.split(",")):
          time.sleep(1.0)
          idle = psutil.Process(proc.pid).memory_info().rss
          sampler = _PeakSampler(proc.pid)
          start = time.monotonic()
          with concurrent.futures.ThreadPoolExecutor(n) as pool:
            statuses = list(pool.map(lambda _: _post(rest_port, body), range(n)))
          seconds = time.monotonic() - start
          peak = sampler.stop()
          print(f"{n} at once: idle RSS {idle / 2**20:.0f} MiB, peak "
                f"{peak / 2**20:.0f} MiB, +{(peak - idle) / 2**20:.0f} MiB, "
                f"{seconds:.1f} s, statuses {statuses}")
      finally:
        proc.terminate()
        try:
          proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()


if __name__ == "__main__":
  main()
