"""Classifies image files with a served model, over gRPC (default) or REST.

  python -m tff_dpmed.predict --server=127.0.0.1:8500 --model_name=cnn a.png b.jpg
  python -m tff_dpmed.predict --rest --server=127.0.0.1:8501 --model_name=cnn a.png

Sends each file's encoded bytes, unchanged, to the `predict_image_bytes`
signature: the server decodes and resizes them to the model's input size, so
any PNG or JPEG works and the client needs no image library. Prints one line
per image: `<file>\t<class name>\t<probability>`. Works against
`tff_dpmed.serve` and against TF Serving itself.
"""


from absl import flags

from tff_dpmed import cli
from tff_dpmed.errors import UsageError
from tff_dpmed.serving import client as client_lib
from tff_dpmed.serving import export

_SERVER = flags.DEFINE_string(
    "server", None,
    "HOST:PORT of the server; default 127.0.0.1:8500 (gRPC) or :8501 (--rest).")
_MODEL_NAME = flags.DEFINE_string(
    "model_name", "cnn",
    "Model name the server serves; training exports under its --model name.")
_MODEL_VERSION = flags.DEFINE_integer(
    "model_version", None, "Version to ask for; default: the newest.")
_REST = flags.DEFINE_boolean("rest", False, "Use the REST API instead of gRPC.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32,
                                   "Images per request.")
_TIMEOUT = flags.DEFINE_float("timeout", 30.0, "Seconds to wait per request.")

# Both are all the graph decodes; checked here so a wrong file is named.
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


def read_image_file(path: str) -> bytes:
  """The file's bytes; UsageError if unreadable or not PNG/JPEG."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
  if not any(data.startswith(magic) for magic in _MAGIC):
    raise UsageError(f"{path} is not a PNG or JPEG file")
  return data


def main(argv: list[str]) -> None:
  paths = argv[1:]
  if not paths:
    raise UsageError("name at least one image file: python -m tff_dpmed.predict "
                     "[--server=HOST:PORT] [--rest] image.png [...]")
  if _BATCH_SIZE.value < 1:
    raise UsageError("--batch_size must be at least 1")
  files = [read_image_file(p) for p in paths]
  default_port = 8501 if _REST.value else 8500
  server = _SERVER.value or f"127.0.0.1:{default_port}"
  try:
    host, port = client_lib.split_server(server, default_port)
  except ValueError:
    raise UsageError(f"--server={server} is not HOST:PORT") from None
  protocol = "REST" if _REST.value else "gRPC"
  if _REST.value:
    client = client_lib.RestClient(f"[{host}]:{port}" if ":" in host else
                                   f"{host}:{port}", timeout=_TIMEOUT.value)
  else:
    client = client_lib.GrpcClient(f"[{host}]:{port}" if ":" in host else
                                   f"{host}:{port}", timeout=_TIMEOUT.value)
  try:
    for start in range(0, len(files), _BATCH_SIZE.value):
      chunk = files[start:start + _BATCH_SIZE.value]
      try:
        outputs = client.predict(
            _MODEL_NAME.value, {export.INPUT_IMAGE_BYTES: chunk},
            signature_name=export.SIGNATURE_IMAGE_BYTES,
            version=_MODEL_VERSION.value)
        predictions = client_lib.to_predictions(outputs)
      except client_lib.ServingClientError as e:
        if e.unreachable:
          raise UsageError(f"cannot reach a model server at {server} over "
                           f"{protocol} ({e.code}: {e.message}); is it running?"
                           " Check --server and --rest") from None
        raise UsageError(f"the server at {server} refused the request "
                         f"({e.code}): {e.message}") from None
      except KeyError as e:
        raise UsageError(f"model {_MODEL_NAME.value} did not return {e}: was it "
                         "exported by tff_dpmed?") from None
      for path, p in zip(paths[start:], predictions):
        print(f"{path}\t{p.class_name}\t{p.probability:.4f}", flush=True)
  finally:
    client.close()


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
