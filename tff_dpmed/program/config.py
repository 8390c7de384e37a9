"""The complete, validated configuration of one training run."""

import dataclasses
import json
import math
import os
from typing import Optional

from tff_dpmed.errors import UsageError

DP_MODES = ("central", "local", "none")
CLIP_MODES = ("adaptive", "fixed")
SAMPLINGS = ("poisson", "fixed", "all")
PARTITIONS = ("iid", "dirichlet")
ACCOUNTANTS = ("auto", "rdp", "pld")
EXECUTORS = ("local", "remote")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  # Data.
  dataset: str = "pneumoniamnist"
  image_size: int = 28
  data_dir: Optional[str] = None
  download: bool = True
  num_clients: int = 100
  partition: str = "iid"
  dirichlet_alpha: float = 0.5
  # Model and optimisation.
  model: str = "cnn"
  rounds: int = 60
  clients_per_round: int = 20
  sampling: str = "poisson"
  client_epochs: int = 1
  client_batch_size: int = 16
  client_learning_rate: float = 0.05
  server_learning_rate: float = 1.0
  server_momentum: float = 0.9
  # Privacy.
  dp_mode: str = "central"
  noise_multiplier: Optional[float] = None
  target_epsilon: Optional[float] = None
  max_epsilon: Optional[float] = None
  delta: Optional[float] = None
  accountant: str = "auto"
  clip_mode: str = "adaptive"
  clip: float = 0.1
  target_unclipped_quantile: float = 0.5
  adaptive_clip_learning_rate: float = 0.2
  clipped_count_stddev: Optional[float] = None
  # Program.
  rounds_per_eval: int = 5
  rounds_per_checkpoint: int = 5
  output_dir: str = "runs"
  experiment_name: str = "default"
  seed: Optional[int] = None
  restart: bool = False
  audit: bool = False
  max_concurrent_computation_calls: int = -1
  # Runtime: a worker of our own (local), or workers at `workers` (remote).
  executor: str = "local"
  workers: Optional[str] = None        # "host:port,host:port", as given to --workers
  worker_binary: Optional[str] = None  # local only; None = the one shipped with TFF
  # Worker network security (issue 17): see README "Scale-out on TFF workers".
  insecure_local_executor: bool = False  # local only: worker on the host's network, no netns
  worker_tls_ca: Optional[str] = None    # remote only, all three or none: mutual TLS to the
  worker_tls_cert: Optional[str] = None  # workers (CA of their certificates; our client
  worker_tls_key: Optional[str] = None   # certificate and its key)

  @property
  def run_dir(self) -> str:
    return os.path.join(self.output_dir, self.experiment_name)

  @property
  def worker_addresses(self) -> list[str]:
    return [a.strip() for a in (self.workers or "").split(",")]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "RunConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})

  def validate(self) -> None:
    """Checks everything that can be checked without reading data."""
    _one_of("dp_mode", self.dp_mode, DP_MODES)
    _one_of("clip_mode", self.clip_mode, CLIP_MODES)
    _one_of("sampling", self.sampling, SAMPLINGS)
    _one_of("partition", self.partition, PARTITIONS)
    _one_of("accountant", self.accountant, ACCOUNTANTS)
    self._validate_runtime()
    if self.image_size not in (28, 64, 128, 224):
      raise UsageError(f"--image_size={self.image_size} is not supported: use 28, 64, 128 or 224")
    _positive_int("rounds", self.rounds)
    _positive_int("num_clients", self.num_clients)
    _positive_int("client_epochs", self.client_epochs)
    _positive_int("client_batch_size", self.client_batch_size)
    _positive_int("rounds_per_eval", self.rounds_per_eval)
    _positive_int("rounds_per_checkpoint", self.rounds_per_checkpoint)
    if self.clients_per_round < 1 or self.clients_per_round > self.num_clients:
      raise UsageError(
          f"--clients_per_round={self.clients_per_round} must be between 1 and "
          f"--num_clients={self.num_clients}")
    for name in ("client_learning_rate", "server_learning_rate"):
      _positive_finite(name, getattr(self, name))
    if not (math.isfinite(self.server_momentum) and 0 <= self.server_momentum < 1):
      raise UsageError(f"--server_momentum={self.server_momentum} must be in [0, 1)")
    if self.partition == "dirichlet":
      _positive_finite("dirichlet_alpha", self.dirichlet_alpha)
    if self.delta is not None and not (0 < self.delta < 1):
      raise UsageError(f"--delta={self.delta} must be in (0, 1): e.g. --delta=1e-5")
    if self.dp_mode == "none":
      for name in ("noise_multiplier", "target_epsilon", "max_epsilon"):
        if getattr(self, name) is not None:
          raise UsageError(f"--{name} has no meaning with --dp_mode=none: drop it or pick a DP mode")
      return
    if self.noise_multiplier is not None and self.target_epsilon is not None:
      raise UsageError("--noise_multiplier and --target_epsilon are alternatives: give only one")
    if self.noise_multiplier is None and self.target_epsilon is None:
      raise UsageError(f"--dp_mode={self.dp_mode} needs --noise_multiplier or --target_epsilon")
    if self.noise_multiplier is not None and not (
        math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
      raise UsageError(f"--noise_multiplier={self.noise_multiplier} must be a finite number >= 0")
    for name in ("target_epsilon", "max_epsilon"):
      if getattr(self, name) is not None:
        _positive_finite(name, getattr(self, name))
    _positive_finite("clip", self.clip)
    if not 0 < self.target_unclipped_quantile < 1:
      raise UsageError(f"--target_unclipped_quantile={self.target_unclipped_quantile} must be in (0, 1)")
    if self.dp_mode == "local" and self.clip_mode == "adaptive":
      raise UsageError(
          "--clip_mode=adaptive is not supported with --dp_mode=local (its clipped-count "
          "query would need its own local randomiser and accounting): use --clip_mode=fixed")

  def _validate_runtime(self) -> None:
    _one_of("executor", self.executor, EXECUTORS)
    # Worker network security (issue 17).
    tls = {"--worker_tls_ca": self.worker_tls_ca, "--worker_tls_cert": self.worker_tls_cert,
           "--worker_tls_key": self.worker_tls_key}
    if any(tls.values()) and self.executor != "remote":
      raise UsageError("--worker_tls_* apply to --executor=remote only (the local worker is "
                       "reached by a private Unix socket): drop them or add --executor=remote")
    if any(tls.values()) and not all(tls.values()):
      missing = ", ".join(name for name, value in tls.items() if not value)
      raise UsageError(f"mutual TLS to the workers needs --worker_tls_ca, --worker_tls_cert "
                       f"and --worker_tls_key together: add {missing}")
    if self.insecure_local_executor and self.executor != "local":
      raise UsageError("--insecure_local_executor applies to --executor=local only: drop it")
    if self.executor == "local":
      if self.workers is not None:
        raise UsageError("--workers needs --executor=remote (the local executor starts its own "
                         "worker): add --executor=remote or drop --workers")
      return
    if not self.workers:
      raise UsageError("--executor=remote needs --workers=HOST:PORT[,HOST:PORT...]: the "
                       "addresses of running `python -m tff_dpmed.worker` processes")
    # Worker settings belong to the workers, which someone else started.
    if self.worker_binary is not None:
      raise UsageError("--worker_binary applies to --executor=local only: with remote workers "
                       "pass it to each `python -m tff_dpmed.worker`")
    if self.max_concurrent_computation_calls != -1:
      raise UsageError("--max_concurrent_computation_calls applies to --executor=local only: "
                       "with remote workers pass it to each `python -m tff_dpmed.worker`")
    addresses = self.worker_addresses
    for address in addresses:
      _check_address(address)
    if len(set(addresses)) != len(addresses):
      raise UsageError(f"--workers={self.workers} names a worker twice: list each once")


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise UsageError(f"--workers entry '{address}' is not HOST:PORT (e.g. 10.0.0.5:8000, "
                     "[::1]:8000), with PORT in 1-65535")


def _one_of(name, value, allowed):
  if value not in allowed:
    raise UsageError(f"--{name}={value} is not one of: {', '.join(allowed)}")


def _positive_int(name, value):
  if not isinstance(value, int) or value < 1:
    raise UsageError(f"--{name}={value} must be a whole number >= 1")


_FLOAT32_MAX = 3.4028234663852886e38


def _positive_finite(name, value):
  # float32 bound too: TFF keeps hyperparameters in float32 state, where 1e300 is inf.
  if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < _FLOAT32_MAX):
    raise UsageError(f"--{name}={value} must be a finite number > 0")


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON so a reader (or a crash) never sees a half-written file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _json_default(o):
  if hasattr(o, "item"):
    return o.item()
  if hasattr(o, "tolist"):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o)}")
