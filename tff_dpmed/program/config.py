"""The complete configuration of one training run, validated once at construction.

Privacy lives in one `DPSpec` (`privacy/spec.py`); `RunConfig` adds data,
model, optimisation and program settings. On disk (config.json,
summary.json, exported metadata) a config is one flat JSON object under the
flag names, as it always was: `to_json` flattens the spec and `from_json`
rebuilds it.
"""

import dataclasses
import enum
import math
import os
import re
from typing import Any, Optional

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy.canary_estimate import MIN_SAMPLES as MIN_CANARIES
from tff_dpmed.privacy.spec import FLOAT32_MAX, DPMode, DPSpec

PARTITIONS = ("iid", "dirichlet", "per_example")
EXECUTORS = ("local", "remote")
# --audit: none; mia (membership inference on examples, program/audit.py); canary
# (client-level canaries, Andrew et al. 2024, program/canary_audit.py).
AUDITS = ("none", "mia", "canary")
# --client_packing: auto packs one-example clients wherever the release is the same
# function of the sampled clients (privacy/packed_clients.py), on insists, off never.
CLIENT_PACKINGS = ("auto", "on", "off")
DEFAULT_NUM_CANARIES = 50
# The one-run example-level audit needs more: with m canaries its lower bound
# cannot exceed about log(q / (1 - q)), q = 0.0125^(1/m) (4.2 at m = 300).
# At most a tenth of the training examples by default (program/canary_audit.py).
DEFAULT_NUM_EXAMPLE_CANARIES = 300
IMAGE_SIZES = (28, 64, 128, 224)
# A run folder is one path component under --output_dir: no separators, no
# '..', nothing hidden, so a run never writes outside --output_dir.
_EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,127}")
_SEED_BOUND = 2**63


def _default_dp() -> DPSpec:
  return DPSpec(mode=DPMode.CENTRAL, num_clients=100, clients_per_round=20)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  # Data.
  dataset: str = "pneumoniamnist"
  image_size: int = 28
  data_dir: Optional[str] = None
  download: bool = True
  partition: str = "iid"
  dirichlet_alpha: float = 0.5
  # Privacy, clients and sampling; noise_multiplier None = calibrate to target_epsilon.
  dp: DPSpec = dataclasses.field(default_factory=_default_dp)
  target_epsilon: Optional[float] = None
  max_epsilon: Optional[float] = None
  # Model and optimisation.
  model: str = "cnn"
  rounds: int = 60
  client_epochs: int = 1
  client_batch_size: int = 16
  client_learning_rate: float = 0.05
  # 0.3 with momentum 0.9: at 1.0 the momentum amplified the noise tenfold and the main
  # job diverged (issue 14); see README "Results so far".
  server_learning_rate: float = 0.3
  server_momentum: float = 0.9
  # Program.
  rounds_per_eval: int = 5
  rounds_per_checkpoint: int = 5
  output_dir: str = "runs"
  experiment_name: str = "default"
  seed: Optional[int] = None
  restart: bool = False
  audit: str = "none"
  # --audit=canary: canary clients (None: DEFAULT_NUM_CANARIES) and the norm of
  # their updates (None: see canary_audit.canary_norm).
  num_canaries: Optional[int] = None
  canary_norm: Optional[float] = None
  # Per-round train loss/accuracy, cohort size and round time in DP modes:
  # outside every DP mechanism, so off unless asked for (debugging only).
  debug_metrics: bool = False
  # A JSON file composing the privacy spent by every run on this data (off: None).
  budget_ledger: Optional[str] = None
  max_concurrent_computation_calls: int = -1
  client_packing: str = "auto"
  # Runtime: a worker of our own (local), or workers at `workers` (remote).
  executor: str = "local"
  workers: Optional[str] = None        # "host:port,host:port", as given to --workers
  worker_binary: Optional[str] = None  # local only; None = the one shipped with TFF
  # Worker network security (issue 17): see README "Scale-out on TFF workers".
  insecure_local_executor: bool = False  # local only: worker on the host's network, no netns
  worker_tls_ca: Optional[str] = None    # remote only, all three or none: mutual TLS to the
  worker_tls_cert: Optional[str] = None  # workers (CA of their certificates; our client
  worker_tls_key: Optional[str] = None   # certificate and its key)

  def __post_init__(self):
    self._validate()

  # The data and program layers need the cohort settings, which the spec owns.
  @property
  def num_clients(self) -> int:
    return self.dp.num_clients

  @property
  def clients_per_round(self) -> int:
    return self.dp.clients_per_round

  @property
  def run_dir(self) -> str:
    return os.path.join(self.output_dir, self.experiment_name)

  @property
  def worker_addresses(self) -> list[str]:
    return [a.strip() for a in (self.workers or "").split(",")]

  def to_json(self) -> dict:
    """One flat object under the flag names (the spec's fields inlined)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, DPSpec):
        spec = value.to_json()
        spec.pop("noise_seed")  # The run's --seed, already below.
        out.update(spec)
      else:
        out[f.name] = value
    return out

  @classmethod
  def from_json(cls, flat: dict) -> "RunConfig":
    """A config from flat flag-named fields (as `to_json` writes); unknown keys ignored."""
    flat = dict(flat)
    spec_names = {f.name for f in dataclasses.fields(DPSpec)} | {"dp_mode"}
    spec_fields = {k: flat.pop(k) for k in list(flat) if k in spec_names}
    names = {f.name for f in dataclasses.fields(cls)} - {"dp"}
    run_fields = {k: v for k, v in flat.items() if k in names}
    if isinstance(run_fields.get("audit"), bool):
      # config.json before issue 15: --audit was a bool meaning membership inference.
      run_fields["audit"] = "mia" if run_fields["audit"] else "none"
    defaults = _default_dp().to_json()
    mode = DPMode(spec_fields.get("dp_mode", defaults["dp_mode"]))
    # Client-side noise (local, example) is seeded by --seed; the server's never is.
    spec_fields["noise_seed"] = (run_fields.get("seed")
                                 if mode in (DPMode.LOCAL, DPMode.EXAMPLE) else None)
    if mode is DPMode.EXAMPLE:
      # DP-SGD's expected batch and step count are the local training settings.
      spec_fields["batch_size"] = run_fields.get("client_batch_size", cls.client_batch_size)
      spec_fields["local_epochs"] = run_fields.get("client_epochs", cls.client_epochs)
    else:
      for name in ("batch_size", "local_epochs", "client_sizes"):
        spec_fields.pop(name, None)
    return cls(dp=DPSpec.from_json({**defaults, **spec_fields}), **run_fields)

  def replace(self, **changes) -> "RunConfig":
    """A copy with flat, flag-named fields changed (spec fields included)."""
    return RunConfig.from_json({**self.to_json(), **changes})

  def _validate(self) -> None:
    """Checks everything that can be checked without reading data."""
    _one_of("partition", self.partition, PARTITIONS)
    self._validate_runtime()
    self._validate_audit()
    self._validate_packing()
    if self.image_size not in IMAGE_SIZES:
      raise UsageError(f"--image_size={self.image_size} is not supported: use 28, 64, 128 or 224")
    for name in ("rounds", "client_epochs", "client_batch_size", "rounds_per_eval",
                 "rounds_per_checkpoint"):
      _positive_int(name, getattr(self, name))
    for name in ("client_learning_rate", "server_learning_rate"):
      _positive_finite(name, getattr(self, name))
    if not (math.isfinite(self.server_momentum) and 0 <= self.server_momentum < 1):
      raise UsageError(f"--server_momentum={self.server_momentum} must be in [0, 1)")
    if self.partition == "dirichlet":
      _positive_finite("dirichlet_alpha", self.dirichlet_alpha)
    if self.seed is not None and not (isinstance(self.seed, int)
                                      and 0 <= self.seed < _SEED_BOUND):
      raise UsageError(f"--seed={self.seed} is outside [0, 2^63): pass a non-negative "
                       "64-bit seed, or omit --seed")
    if not _EXPERIMENT_NAME.fullmatch(self.experiment_name or ""):
      raise UsageError(f"--experiment_name={self.experiment_name!r} must be one folder name "
                       "(letters, digits, '_', '-', '.', '=', '+'; no '/' or '..', at most 128 "
                       "characters): it is created under --output_dir")
    if self.dp.reproducible_sampling and self.seed is None:
      raise UsageError("--insecure_reproducible_sampling needs --seed (it seeds client "
                       "sampling with it): add --seed or drop the flag")
    if self.dp.mode is DPMode.NONE:
      for name in ("target_epsilon", "max_epsilon"):
        if getattr(self, name) is not None:
          raise UsageError(f"--{name} has no meaning with --dp_mode=none: drop it or pick a DP mode")
      return
    # Both set is a calibrated config (`trainer.prepare`); `check_noise_flags` refuses
    # a user giving both.
    if self.dp.noise_multiplier is None and self.target_epsilon is None:
      raise UsageError(f"--dp_mode={self.dp.mode.value} needs --noise_multiplier or "
                       "--target_epsilon")
    for name in ("target_epsilon", "max_epsilon"):
      if getattr(self, name) is not None:
        _positive_finite(name, getattr(self, name))

  @property
  def packs_clients(self) -> bool:
    """Whether a round's one-example clients go to TFF in packs (--client_packing)."""
    return self.client_packing != "off" and self.packing_obstacle() is None

  def packing_obstacle(self) -> Optional[str]:
    """Why packing would change what is released (None: it would not)."""
    if self.partition != "per_example":
      return "it needs one example per client (--partition=per_example)"
    if self.dp.mode is not DPMode.CENTRAL or self.dp.adaptive:
      return ("it needs --dp_mode=central with --clip_mode=fixed (adaptive clipping counts "
              "unclipped clients, which a pack hides; other modes noise elsewhere)")
    if self.client_epochs != 1:
      return "a packed client takes one local step (--client_epochs=1)"
    if self.debug_metrics or self.audit == "canary":
      return "--debug_metrics and --audit=canary need every client on its own"
    return None

  def _validate_packing(self) -> None:
    _one_of("client_packing", self.client_packing, CLIENT_PACKINGS)
    obstacle = self.packing_obstacle()
    if self.client_packing == "on" and obstacle is not None:
      raise UsageError(f"--client_packing=on cannot pack this run: {obstacle}; use "
                       "--client_packing=auto or off")

  def _validate_audit(self) -> None:
    _one_of("audit", self.audit, AUDITS)
    canary_flags = [f"--{name}" for name in ("num_canaries", "canary_norm")
                    if getattr(self, name) is not None]
    if self.audit != "canary":
      if canary_flags:
        raise UsageError(f"{', '.join(canary_flags)} without --audit=canary has no effect: add "
                         "--audit=canary or drop it")
      return
    if self.num_canaries is not None and (
        isinstance(self.num_canaries, bool) or not isinstance(self.num_canaries, int)
        or not MIN_CANARIES <= self.num_canaries <= 100_000):
      raise UsageError(f"--num_canaries={self.num_canaries} must be a whole number from "
                       f"{MIN_CANARIES} to 100000 (default {DEFAULT_NUM_CANARIES})")
    if self.canary_norm is not None:
      if self.dp.mode is DPMode.EXAMPLE:
        raise UsageError("--canary_norm sets the update of a canary client; --dp_mode=example "
                         "audits with canary examples, which have no such norm: drop it")
      _positive_finite("canary_norm", self.canary_norm)

  @property
  def canary_count(self) -> int:
    """Canaries of --audit=canary (0 without it): examples under --dp_mode=example,
    clients otherwise."""
    if self.audit != "canary":
      return 0
    if self.num_canaries is not None:
      return self.num_canaries
    return DEFAULT_NUM_EXAMPLE_CANARIES if self.example_canaries else DEFAULT_NUM_CANARIES

  @property
  def example_canaries(self) -> bool:
    """Whether the canary audit is the example-level one (canary examples, not clients)."""
    return self.audit == "canary" and self.dp.mode is DPMode.EXAMPLE

  @property
  def canary_clients(self) -> int:
    """Canary clients that take part in rounds (client-level canary audit only)."""
    return 0 if self.example_canaries else self.canary_count

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


def check_noise_flags(flat: dict) -> None:
  """Refuses flags that give both --noise_multiplier and --target_epsilon."""
  if flat.get("noise_multiplier") is not None and flat.get("target_epsilon") is not None:
    raise UsageError("--noise_multiplier and --target_epsilon are alternatives: give only one")


def default(name: str) -> Any:
  """The default of a flat, flag-named config field (for flag definitions)."""
  run_defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name != "dp"}
  value = {**_default_dp().to_json(), **run_defaults}[name]
  return value.value if isinstance(value, enum.Enum) else value


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise UsageError(f"--workers entry '{address}' is not HOST:PORT (e.g. 10.0.0.5:8000, "
                     "[::1]:8000), with PORT in 1-65535")


def _one_of(name, value, allowed):
  if value not in allowed:
    raise UsageError(f"--{name}={value} is not one of: {', '.join(allowed)}")


def _positive_int(name, value):
  if not isinstance(value, int) or not 1 <= value <= 10**9:
    raise UsageError(f"--{name}={value} must be a whole number between 1 and 10^9")


def _positive_finite(name, value):
  # float32 bound too: TFF keeps hyperparameters in float32 state, where 1e300 is inf.
  if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < FLOAT32_MAX):
    raise UsageError(f"--{name}={value} must be a number > 0 that fits a float32 (below "
                     "3.4e38)")
