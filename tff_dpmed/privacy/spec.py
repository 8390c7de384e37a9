"""`DPSpec`: everything the privacy of a run depends on, validated once.

One frozen value, built from flags by the trainer and the calculator alike,
carries the DP placement, the noise, the clipping and the sampling that the
accountant assumes. `__post_init__` is the only place that checks them, so a
`DPSpec` that exists is valid, and every later layer (mechanisms, accounting,
the ledger, the trainer) can trust it.

Kept free of TensorFlow so the privacy calculator starts in a fraction of a
second.
"""

import dataclasses
import enum
import math
import numbers
from typing import Any, Optional

from tff_dpmed.errors import UsageError


class DPMode(str, enum.Enum):
  """Where the noise is added (one `mechanisms.Mechanism` class each)."""
  CENTRAL = "central"
  # DP-FTRL: the server noises prefix sums over rounds by tree aggregation.
  CENTRAL_TREE = "central_tree"
  LOCAL = "local"
  EXAMPLE = "example"
  NONE = "none"


class Sampling(str, enum.Enum):
  """How each round's clients are drawn, exactly as the accountant assumes."""
  POISSON = "poisson"
  FIXED = "fixed"
  ALL = "all"


class Accountant(str, enum.Enum):
  AUTO = "auto"
  RDP = "rdp"
  PLD = "pld"


class LocalBatching(str, enum.Enum):
  """How DP-SGD's local batches scale with a hospital's size (example mode)."""
  # Expected batch B everywhere: rate B / n_k, so the smallest hospital is the worst off.
  FIXED_SIZE = "fixed_size"
  # One rate q = B K / sum n_k everywhere (expected batch q n_k): every hospital has the
  # epsilon of one, and the server weights updates by n_k.
  FIXED_RATE = "fixed_rate"


class ClipMode(str, enum.Enum):
  ADAPTIVE = "adaptive"
  FIXED = "fixed"


def choices(enum_type) -> tuple:
  """The flag values of an enum, in declaration order."""
  return tuple(member.value for member in enum_type)


# TFF's own default clipped-count stddev, per expected client.
_TFF_CLIPPED_COUNT_STDDEV_PER_CLIENT = 0.05
# TFF keeps hyperparameters in float32 state, where larger values are inf.
FLOAT32_MAX = 3.4028234663852886e38
# The smallest positive clip norm that stays a normal float32.
_FLOAT32_TINY = 1.1754943508222875e-38


def default_delta(num_units: int) -> float:
  """The default delta for `num_units` privacy units.

  delta bounds the probability of a catastrophic failure *per unit*, so it
  must be well below 1/num_units (delta >= 1/N permits "publish one unit's
  data"): min(1e-5, 10^-(ceil(log10 N) + 1)).
  """
  n = _integer(num_units, "num_clients")
  if n < 1:
    raise UsageError(f"--num_clients={n} must be at least 1: pass the number of clients")
  # Digits of N - 1 is ceil(log10(N)) without floating-point rounding.
  ceil_log10 = len(str(n - 1)) if n > 1 else 0
  return min(1e-5, 10.0 ** -(ceil_log10 + 1))


def choose_clipped_count_stddev(noise_multiplier: float, clients_per_round: float) -> float:
  """The clipped-count noise stddev s given to TFF's adaptive clipping.

  TFF's default, s = 0.05 * clients_per_round, raises unless z < 2 s, i.e.
  it needs more than 10 z clients per round (12+ for z = 1.1). Taking s >= z
  always satisfies z < 2 s; at s = z the update noise is inflated to
  z_v = z / sqrt(1 - 1/4) ~ 1.155 z. Whatever s is, the two releases compose
  to exactly one Gaussian with multiplier z, so epsilon does not depend on s.
  Returns 0 when z == 0 (nothing is claimed; TFF does the same).
  """
  if noise_multiplier == 0:
    return 0.0
  return max(_TFF_CLIPPED_COUNT_STDDEV_PER_CLIENT * float(clients_per_round),
             float(noise_multiplier))


@dataclasses.dataclass(frozen=True)
class DPSpec:
  """The privacy of one run.

  Attributes:
    mode: Where noise is added: central (server), central_tree (server, DP-FTRL's
      tree over rounds), local (each client), example (DP-SGD in each client), none.
    noise_multiplier: z, noise stddev in units of the clip norm. With
      adaptive clipping, TFF's *total effective* multiplier. None only while
      it is still to be calibrated from a target epsilon
      (`calibration.calibrate`); mechanisms refuse such a spec.
    num_clients: N, the number of clients (the privacy units).
    clients_per_round: The expected cohort size (exact for fixed sampling).
    sampling: How cohorts are drawn.
    delta: The delta of (epsilon, delta); None takes `default_delta(N)`.
    accountant: rdp, pld, or auto (PLD where it supports the event).
    clip_mode: adaptive (central only) or fixed.
    clip: The fixed clip norm C, or the initial one for adaptive clipping.
    target_unclipped_quantile: Adaptive: the quantile of update norms tracked.
    adaptive_clip_learning_rate: Adaptive: the clip norm's geometric rate.
    clipped_count_stddev: Adaptive: the stddev s of the clipped-count noise as
      the user gave it; None means `choose_clipped_count_stddev`, see
      `count_stddev` for the value used.
    noise_seed: Seeds the local-DP client noise. Seeded noise is predictable,
      hence not private: debugging only. None draws non-deterministic noise.
    reproducible_sampling: Client sampling is seeded (--seed with
      --insecure_reproducible_sampling). Whoever knows the seed knows each
      cohort, so sampling amplifies nothing and is not accounted as if it did.
    batch_size: Example mode: the expected local batch B; each example joins
      a local step with probability B / n_k (Poisson), and the noised sum is
      divided by B, a fixed denominator.
    local_epochs: Example mode: E; a client with n_k examples takes
      `local_steps(n_k)` = ceil(E n_k / B) DP-SGD steps per round.
    client_sizes: Example mode: n_k of every client, in client order. Treated
      as public, as DP-SGD treats its data set size.
    local_batching: Example mode: fixed_size (rate B / n_k) or fixed_rate (one
      rate B K / sum n_k, so B is the batch of a hospital of average size).
    client_dp: Example mode: the client-level layer at the server as well
      (central: clip each client update to `server_clip` and add
      N(0, (server_noise_multiplier * server_clip)^2) to the sum), or none.
  """
  mode: DPMode
  noise_multiplier: Optional[float] = None
  num_clients: int = 1
  clients_per_round: int = 1
  sampling: Sampling = Sampling.POISSON
  delta: Optional[float] = None
  accountant: Accountant = Accountant.AUTO
  clip_mode: ClipMode = ClipMode.ADAPTIVE
  clip: float = 0.1
  target_unclipped_quantile: float = 0.5
  adaptive_clip_learning_rate: float = 0.2
  clipped_count_stddev: Optional[float] = None
  noise_seed: Optional[int] = None
  reproducible_sampling: bool = False
  batch_size: Optional[int] = None
  local_epochs: int = 1
  client_sizes: tuple = ()
  client_dp: DPMode = DPMode.NONE
  local_batching: LocalBatching = LocalBatching.FIXED_SIZE
  server_noise_multiplier: Optional[float] = None
  server_clip: Optional[float] = None

  def __post_init__(self):
    set_field = lambda name, value: object.__setattr__(self, name, value)
    set_field("mode", _enum(DPMode, self.mode, "dp_mode"))
    set_field("sampling", _enum(Sampling, self.sampling, "sampling"))
    set_field("accountant", _enum(Accountant, self.accountant, "accountant"))
    set_field("clip_mode", _enum(ClipMode, self.clip_mode, "clip_mode"))
    set_field("client_dp", _enum(DPMode, self.client_dp, "client_dp"))
    set_field("client_sizes", tuple(self.client_sizes))  # Hashable, from JSON lists too.
    set_field("local_batching", _enum(LocalBatching, self.local_batching, "local_batching"))
    n = _integer(self.num_clients, "num_clients")
    if n < 1:
      raise UsageError(f"--num_clients={n} must be at least 1: pass the number of clients")
    m = _integer(self.clients_per_round, "clients_per_round")
    if not 1 <= m <= n:
      raise UsageError(f"--clients_per_round={m} is outside [1, num_clients={n}]: use a "
                       "cohort size between 1 and the number of clients")
    set_field("num_clients", n)
    set_field("clients_per_round", m)
    if self.delta is None and self.mode is DPMode.EXAMPLE:
      if not self.client_sizes:
        # The unit is an example: delta waits for the data's size (`client_sizes`).
        self._validate_example_level()
        return
      set_field("delta", default_delta(sum(self.client_sizes)))
    if self.delta is None:
      set_field("delta", default_delta(n))
    d = _finite(self.delta, "delta")
    if not 0 < d < 1:
      raise UsageError(f"--delta={d:g} is outside (0, 1): use a small positive delta below "
                       f"1/num_clients, e.g. {default_delta(n):g}")
    set_field("delta", d)
    if not isinstance(self.reproducible_sampling, bool):
      raise UsageError(f"reproducible_sampling={self.reproducible_sampling!r} must be True "
                       "or False")
    if self.noise_seed is not None:
      seed = _integer(self.noise_seed, "seed")
      if not -2**63 <= seed < 2**63:
        raise UsageError(f"--seed={seed} is not a 64-bit integer: pass one or omit --seed")
    if self.noise_multiplier is not None:
      z = _finite(self.noise_multiplier, "noise_multiplier")
      if z < 0:
        raise UsageError(f"--noise_multiplier={z:g} is negative: use a value >= 0")
      if z >= FLOAT32_MAX:
        raise UsageError(f"--noise_multiplier={z:g} does not fit a float32: use a value "
                         "below 3.4e38")
      set_field("noise_multiplier", z)
    if self.mode is DPMode.NONE:
      if self.noise_multiplier:
        # Noise the user asked for would otherwise be silently ignored.
        raise UsageError(f"--noise_multiplier={self.noise_multiplier:g} has no effect with "
                         "--dp_mode=none: drop it or use --dp_mode=central or --dp_mode=local")
      set_field("noise_multiplier", 0.0)
      return
    self._validate_clipping()
    self._validate_example_level()
    if self.mode is DPMode.CENTRAL_TREE and self.sampling is not Sampling.ALL:
      raise UsageError(
          f"--dp_mode=central_tree (DP-FTRL) is for every client in every round and is "
          f"accounted so; --sampling={self.sampling.value} would waste its budget: use "
          "--sampling=all with --clients_per_round=--num_clients, or --dp_mode=central")
    if self.sampling is Sampling.ALL and m != n:
      raise UsageError(
          f"--sampling=all means every client every round, but --clients_per_round={m} != "
          f"--num_clients={n}: set them equal or use --sampling=poisson or --sampling=fixed")

  def _validate_example_level(self) -> None:
    """DP-SGD inside the clients: batch, epochs, client sizes, the server layer."""
    set_field = lambda name, value: object.__setattr__(self, name, value)
    if self.mode is not DPMode.EXAMPLE:
      if self.client_dp is not DPMode.NONE:
        raise UsageError(f"--client_dp={self.client_dp.value} adds a client-level layer to "
                         "--dp_mode=example only: drop it, or use --dp_mode=example")
      return
    if self.clip_mode is ClipMode.ADAPTIVE:
      raise UsageError(
          "adaptive clipping is not supported with --dp_mode=example: a per-example clip "
          "norm estimated from the data would need its own private query; use "
          "--clip_mode=fixed with --clip (per-example L2 clip norm)")
    b = _integer(self.batch_size, "client_batch_size")
    if b < 1:
      raise UsageError(f"--client_batch_size={b} must be at least 1")
    e = _integer(self.local_epochs, "client_epochs")
    if e < 1:
      raise UsageError(f"--client_epochs={e} must be at least 1")
    set_field("batch_size", b)
    set_field("local_epochs", e)
    sizes = tuple(_integer(k, "client size") for k in self.client_sizes)
    if sizes:
      if len(sizes) != self.num_clients:
        raise ValueError(f"{len(sizes)} client sizes for {self.num_clients} clients")
      if min(sizes) < 1:
        raise UsageError("a client has no examples: every client needs at least one")
      if self.local_batching is LocalBatching.FIXED_RATE and b * len(sizes) > sum(sizes):
        raise UsageError(
            f"the batch size {b} is larger than the average client ({sum(sizes) / len(sizes):.1f} "
            "examples): with --local_batching=fixed_rate every client samples at rate "
            "B * clients / examples, which must be <= 1; lower --client_batch_size")
      if self.local_batching is LocalBatching.FIXED_SIZE and b > min(sizes):
        raise UsageError(
            f"the batch size {b} is larger than the smallest client ({min(sizes)} "
            f"examples): Poisson sampling joins each example with probability B / n_k, "
            f"which must be <= 1; use a batch size (--client_batch_size) <= {min(sizes)} "
            "or fewer clients")
    set_field("client_sizes", sizes)
    if self.client_dp not in (DPMode.NONE, DPMode.CENTRAL):
      raise UsageError(f"--client_dp={self.client_dp.value} is not available: use none or "
                       "central (the server clips and noises each client's update)")
    server = {"--server_noise_multiplier": self.server_noise_multiplier,
              "--server_clip": self.server_clip}
    if self.client_dp is DPMode.NONE:
      given = [k for k, v in server.items() if v is not None]
      if given:
        raise UsageError(f"{', '.join(given)} only apply with --client_dp=central: drop "
                         "them or add --client_dp=central")
      return
    missing = [k for k, v in server.items() if v is None]
    if missing:
      raise UsageError(f"--client_dp=central needs {' and '.join(missing)} (the client-level "
                       "noise multiplier and the clip norm of each client's update)")
    z = _finite(self.server_noise_multiplier, "server_noise_multiplier")
    if not 0 <= z < FLOAT32_MAX:
      raise UsageError(f"--server_noise_multiplier={z:g} must be >= 0 and fit a float32")
    clip = _finite(self.server_clip, "server_clip")
    if not _FLOAT32_TINY <= clip < FLOAT32_MAX:
      raise UsageError(f"--server_clip={clip:g} must be a positive float32: e.g. 1.0")
    set_field("server_noise_multiplier", z)
    set_field("server_clip", clip)

  def sampling_rate(self, client_size: int) -> float:
    """Example mode: the Poisson rate of a client with `client_size` examples."""
    if self.local_batching is LocalBatching.FIXED_RATE:
      return self.batch_size * len(self.client_sizes) / sum(self.client_sizes)
    return self.batch_size / client_size

  def local_steps(self, client_size: int) -> int:
    """Example mode: DP-SGD steps per round of a client with `client_size` examples:
    its local epochs at its expected batch, rounded up."""
    if self.local_batching is LocalBatching.FIXED_RATE:
      # ceil(E / q) in integers: E * sum(n) / (B * K), rounded up.
      return -(-self.local_epochs * sum(self.client_sizes)
               // (self.batch_size * len(self.client_sizes)))
    return -(-self.local_epochs * client_size // self.batch_size)

  def client_level_spec(self) -> Optional["DPSpec"]:
    """Example mode with --client_dp=central: the server layer as a central-DP spec."""
    if self.mode is not DPMode.EXAMPLE or self.client_dp is DPMode.NONE:
      return None
    return DPSpec(mode=DPMode.CENTRAL, noise_multiplier=self.server_noise_multiplier,
                  num_clients=self.num_clients, clients_per_round=self.clients_per_round,
                  sampling=self.sampling, accountant=self.accountant,
                  clip_mode=ClipMode.FIXED, clip=self.server_clip,
                  reproducible_sampling=self.reproducible_sampling)

  def _validate_clipping(self) -> None:
    clip = _finite(self.clip, "clip")
    if not _FLOAT32_TINY <= clip < FLOAT32_MAX:
      raise UsageError(f"--clip={clip:g} must be a positive float32 (between 1.2e-38 and "
                       "3.4e38): use a clip norm such as 0.1")
    object.__setattr__(self, "clip", clip)
    if self.mode is DPMode.CENTRAL_TREE and self.clip_mode is ClipMode.ADAPTIVE:
      raise UsageError(
          "adaptive clipping is not supported with --dp_mode=central_tree: its clip-norm "
          "query would need its own tree; use --clip_mode=fixed with --clip")
    if self.mode is DPMode.LOCAL and self.clip_mode is ClipMode.ADAPTIVE:
      raise UsageError(
          "adaptive clipping is not supported with --dp_mode=local: its clipped-count "
          "query would need its own local randomiser and accounting; use --clip_mode=fixed")
    if self.clip_mode is ClipMode.FIXED:
      if self.clipped_count_stddev is not None:
        raise UsageError("--clipped_count_stddev only applies to --clip_mode=adaptive: "
                         "omit it or use --clip_mode=adaptive")
      return
    q = _finite(self.target_unclipped_quantile, "target_unclipped_quantile")
    if not 0 < q < 1:
      raise UsageError(f"--target_unclipped_quantile={q:g} is outside (0, 1): use e.g. 0.5")
    rate = _finite(self.adaptive_clip_learning_rate, "adaptive_clip_learning_rate")
    if not 0 <= rate < FLOAT32_MAX:
      raise UsageError(f"--adaptive_clip_learning_rate={rate:g} must be >= 0 and fit a "
                       "float32: use e.g. 0.2")
    if self.clipped_count_stddev is not None:
      s = _finite(self.clipped_count_stddev, "clipped_count_stddev")
      if not 0 <= s < FLOAT32_MAX:
        raise UsageError(f"--clipped_count_stddev={s:g} must be >= 0 and fit a float32, "
                         "or be omitted")
      z = self.noise_multiplier
      if z is not None and z > 0 and z >= 2 * s:
        raise UsageError(
            f"--clipped_count_stddev={s:g} is too small for --noise_multiplier={z:g}: "
            "adaptive clipping needs noise_multiplier < 2 * clipped_count_stddev because "
            "the noised clipped-client count spends part of the privacy budget; raise "
            f"--clipped_count_stddev above {z / 2:g}, or omit it to use "
            "max(0.05 * clients_per_round, noise_multiplier)")

  @property
  def adaptive(self) -> bool:
    """TFF's adaptive clipping (central DP with clip_mode adaptive)."""
    return self.mode is DPMode.CENTRAL and self.clip_mode is ClipMode.ADAPTIVE

  @property
  def count_stddev(self) -> float:
    """The clipped-count stddev s used (adaptive clipping), given or chosen."""
    if self.clipped_count_stddev is not None:
      return float(self.clipped_count_stddev)
    return choose_clipped_count_stddev(self.noise_multiplier or 0.0, self.clients_per_round)

  @property
  def count_stddev_source(self) -> str:
    if self.clipped_count_stddev is not None:
      return "given by --clipped_count_stddev"
    return "automatic: max(0.05 * clients_per_round, noise_multiplier)"

  def with_noise(self, noise_multiplier: float) -> "DPSpec":
    """The same spec at another z (validated again)."""
    return dataclasses.replace(self, noise_multiplier=float(noise_multiplier))

  def to_json(self) -> dict:
    """Flat, JSON-ready fields under their flag names (dp_mode, not mode)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out = {k: v.value if isinstance(v, enum.Enum) else v for k, v in out.items()}
    out["client_sizes"] = list(out["client_sizes"])
    out["dp_mode"] = out.pop("mode")
    return out

  @classmethod
  def from_json(cls, data: dict) -> "DPSpec":
    """Inverse of `to_json`; ignores keys that are not spec fields."""
    data = dict(data)
    data["mode"] = data.pop("dp_mode")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _enum(enum_type, value: Any, name: str):
  try:
    return enum_type(value)
  except ValueError:
    raise UsageError(f"unknown --{name}={value!r}: use one of "
                     f"{', '.join(choices(enum_type))}") from None


def _finite(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise UsageError(f"--{name}={value!r} is not a number: pass a finite number")
  value = float(value)
  if not math.isfinite(value):
    raise UsageError(f"--{name}={value} is not finite: pass a finite number")
  return value


def _integer(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise UsageError(f"--{name}={value!r} is not an integer: pass a whole number")
  return int(value)
