"""Local DP: each client clips and noises its own update; the server only averages.

Unlike central DP (`central_dp.py`), nothing here trusts the server: the
Gaussian noise is added inside the `tff.CLIENTS`-placed computation, so the
value that leaves a client is already private on its own, and the server-side
aggregation (by default `tff.federated_mean`) only sees noised values.

Design: a hand-written `UnweightedAggregationFactory` rather than a TF Privacy
`DPQuery`. `DifferentiallyPrivateFactory` runs `preprocess_record` on clients,
so a query that noises there would work, but TF Privacy's Gaussian queries
draw noise from a generator in the *global* (server) state, and a DPQuery
would still produce a central-DP `DpEvent` that misdescribes the mechanism.
Here the randomness is derived per client, per round, inside the client
computation, and the accounting is left to `accounting.py`.

Randomness:
  * Without a seed every client draws its noise seed from the OS
    (`NonDeterministicInts`), so noise is fresh per client and per round and
    unaffected by any TF global seed the trainer sets.
  * With a seed the server state carries (seed, round) and broadcasts it; as
    TFF clients do not know their ids, each client folds in a fingerprint of
    its own update to get a distinct stateless seed. The result is
    reproducible, hence NOT private (anyone with the seed can predict the
    noise), and clients with bit-identical updates get identical noise: use a
    seed for debugging only.
"""

import collections
from typing import Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import safe_updates

_SEED_DTYPE = np.int64


class _FederatedMeanFactory(tff.aggregators.UnweightedAggregationFactory):
  """Stateless unweighted mean: `tff.federated_mean` with no measurements."""

  def create(self, value_type) -> tff.templates.AggregationProcess:

    @tff.federated_computation()
    def init_fn():
      return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(init_fn.type_signature.result,
                               tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      return tff.templates.MeasuredProcessOutput(
          state=state,
          result=tff.federated_mean(value),
          measurements=tff.federated_value((), tff.SERVER))

    return tff.templates.AggregationProcess(init_fn, next_fn)


class LocalGaussianFactory(tff.aggregators.UnweightedAggregationFactory):
  """Client-side L2 clipping and Gaussian noise, then a server-side mean.

  Each client scales its whole update (the global L2 norm over all tensors of
  the structure) to norm <= `clip`, adds N(0, (noise_multiplier * clip)^2)
  to every coordinate, and only then hands the value to the mean. So each
  client's output is a Gaussian mechanism with sensitivity 2 * clip under
  replace-one (clip under add/remove) and noise multiplier z, and the mean of
  n clients carries per-coordinate noise stddev z * clip / sqrt(n).

  State (at SERVER): OrderedDict(noise=OrderedDict(round_num[, seed]),
  mean_state); `seed` only when seeded. Measurements (at SERVER): OrderedDict(clip, noise_stddev,
  mean); constants only, nothing about individual clients is released (e.g.
  no count of clipped clients, which would be unprivatised).
  """

  def __init__(self, clip: float, noise_multiplier: float, seed: Optional[int] = None,
               mean_factory: Optional[tff.aggregators.UnweightedAggregationFactory] = None):
    """Initialises the factory.

    Args:
      clip: L2 clip norm C of each client's whole update (> 0).
      noise_multiplier: z >= 0; each client adds noise of stddev z * C.
      seed: None for non-deterministic noise (the private setting), or an
        int64 seed for a reproducible, non-private debugging run.
      mean_factory: Aggregates the already-noised client values into their
        unweighted mean at SERVER; defaults to `tff.federated_mean`. It runs
        after the noise, so it cannot weaken the local guarantee.

    Raises:
      UsageError: If `clip`, `noise_multiplier` or `seed` is invalid.
    """
    # Validated here too: tests and benchmarks build the factory without a spec.
    if not (isinstance(clip, (int, float)) and 0 < clip < float("inf")):
      raise UsageError(f"--clip={clip!r} must be a positive finite number: e.g. 0.1")
    if not (isinstance(noise_multiplier, (int, float)) and 0 <= noise_multiplier < float("inf")):
      raise UsageError(f"--noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if seed is not None and not (isinstance(seed, int) and -2**63 <= seed < 2**63):
      raise UsageError(f"--seed={seed!r} is not a 64-bit integer: pass one or omit --seed")
    self._clip = float(clip)
    self._noise_multiplier = float(noise_multiplier)
    self._seed = None if seed is None else int(seed)
    self._mean_factory = mean_factory or _FederatedMeanFactory()
    if self._seed is not None:
      logging.warning("Local DP noise is seeded (seed=%d): the run is reproducible "
                      "and NOT differentially private; use a seed for debugging only.",
                      self._seed)

  @property
  def clip(self) -> float:
    return self._clip

  @property
  def noise_stddev(self) -> float:
    """Per-coordinate stddev of the noise each client adds."""
    return self._noise_multiplier * self._clip

  def create(self, value_type) -> tff.templates.AggregationProcess:
    """Builds the process for client values of `value_type` (floats only)."""
    value_type = tff.to_type(value_type)
    if not (isinstance(value_type, (tff.TensorType, tff.StructType))
            and tff.types.is_structure_of_floats(value_type)):
      raise TypeError(f"LocalGaussianFactory needs a structure of float tensors, "
                      f"got {value_type}")
    clip = self._clip
    stddev = self.noise_stddev
    seeded = self._seed is not None
    mean_process = self._mean_factory.create(value_type)

    def clip_and_noise(value, seed):
      """Clips `value` to global L2 norm <= clip and adds noise seeded by `seed`."""
      flat = tf.nest.flatten(value)
      clipped = safe_updates.safe_clip(flat, clip)
      if stddev > 0:
        # One independent stateless stream per tensor of the structure.
        seeds = tf.random.experimental.stateless_split(seed, num=len(flat))
        clipped = [c + tf.random.stateless_normal(tf.shape(c), seed=seeds[i],
                                                  stddev=stddev, dtype=c.dtype)
                   for i, c in enumerate(clipped)]
      return tf.nest.pack_sequence_as(value, clipped)

    seed_vector_type = tff.TensorType(_SEED_DTYPE, [2])

    if seeded:

      @tff.tensorflow.computation(value_type, seed_vector_type)
      def client_fn(value, round_seed):
        # Clients are anonymous in TFF: their own update is what tells them apart.
        client_seed = round_seed
        for t in tf.nest.flatten(value):
          fp = tf.fingerprint(tf.reshape(t, [1, -1]))  # uint8[1, 8]
          client_seed = tf.random.experimental.stateless_fold_in(
              client_seed, tf.bitcast(tf.reshape(fp, [8]), tf.int64))
        return clip_and_noise(value, client_seed)

      @tff.tensorflow.computation
      def init_noise_state():
        return collections.OrderedDict(
            round_num=tf.constant(0, tf.int64),
            seed=tf.constant(self._seed, tf.int64))

      @tff.tensorflow.computation(init_noise_state.type_signature.result)
      def round_seed_fn(noise_state):
        return tf.stack([noise_state["seed"], noise_state["round_num"]])

    else:

      @tff.tensorflow.computation(value_type)
      def client_fn(value):
        # From the OS, so a TF global seed set by the trainer cannot repeat it.
        return clip_and_noise(value, tf.raw_ops.NonDeterministicInts(
            shape=[2], dtype=tf.int64))

      @tff.tensorflow.computation
      def init_noise_state():
        return collections.OrderedDict(round_num=tf.constant(0, tf.int64))

    @tff.tensorflow.computation(init_noise_state.type_signature.result)
    def advance(noise_state):
      new_state = collections.OrderedDict(noise_state)
      new_state["round_num"] = noise_state["round_num"] + 1
      return new_state

    @tff.tensorflow.computation
    def constant_measurements():
      return collections.OrderedDict(clip=tf.constant(clip, tf.float32),
                                     noise_stddev=tf.constant(stddev, tf.float32))

    @tff.federated_computation()
    def init_fn():
      noise_state = tff.federated_eval(init_noise_state, tff.SERVER)
      return tff.federated_zip(collections.OrderedDict(
          noise=noise_state, mean_state=mean_process.initialize()))

    @tff.federated_computation(init_fn.type_signature.result,
                               tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      if seeded:
        round_seed = tff.federated_broadcast(tff.federated_map(round_seed_fn, state.noise))
        noised = tff.federated_map(client_fn, (value, round_seed))
      else:
        noised = tff.federated_map(client_fn, value)
      # Only noised, CLIENTS-placed values ever reach the server-side mean.
      mean_output = mean_process.next(state.mean_state, noised)
      new_state = tff.federated_zip(collections.OrderedDict(
          noise=tff.federated_map(advance, state.noise),
          mean_state=mean_output.state))
      constants = tff.federated_eval(constant_measurements, tff.SERVER)
      measurements = tff.federated_zip(collections.OrderedDict(
          clip=constants.clip, noise_stddev=constants.noise_stddev,
          mean=mean_output.measurements))
      return tff.templates.MeasuredProcessOutput(
          state=new_state, result=mean_output.result, measurements=measurements)

    return tff.templates.AggregationProcess(init_fn, next_fn)
