"""Federated client datasets that share one copy of the images.

A client is only a slice of one flat index array: `make_federated_train_data`
keeps a single tensor of all images and labels, plus all clients' indices
concatenated and an offsets vector, so 10,000 clients cost the images plus
8 bytes per example. Building a client's `tf.data` pipeline gathers that
client's examples (its dataset then holds only them); the pipeline shuffles
their positions (cheap, so the whole client is shuffled, not a window),
repeats them for the local epochs, batches them, and only then gathers and
normalises the images of each batch.
"""

import collections
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_dpmed.data.preprocess import model_inputs, preprocess_images
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError

# Mixed into the per-client shuffle seed so client i and seed+i do not collide.
_SEED_STRIDE = 1_000_003
# What `dataset_computation` may embed as graph constants (protobuf's hard limit is 2 GB).
MAX_EMBEDDED_BYTES = 1 << 30
# How a user sets each size (train.py's flags), for error messages.
_HINTS = {"batch_size": "--client_batch_size=32", "epochs": "--client_epochs=1",
          "shuffle_buffer": "shuffle_buffer=1000"}


def preprocess_labels(labels, info: DatasetInfo) -> tf.Tensor:
  """int32 class indices, or float32 multi-hot `(B, K)` for multi-label tasks."""
  return tf.cast(labels, tf.float32 if info.multi_label else tf.int32)


def _check_arrays(images: np.ndarray, labels: np.ndarray, info: DatasetInfo) -> None:
  """Images are uint8 (N, H, W, C) of `info`'s shape, or float32 (N, h, w, c) features."""
  if images.dtype not in (np.uint8, np.float32) or images.ndim != 4:
    raise UsageError(f"images have dtype {images.dtype} and shape {images.shape}, expected "
                     "uint8 (N, H, W, C), or float32 features (N, h, w, c): load them with "
                     "tff_dpmed.data, or compute features with tff_dpmed.models.feature_stage")
  if images.dtype == np.float32:
    # A feature's shape is the model's business (its input spec); NaNs would only
    # surface rounds later, as a non-finite model.
    if not np.isfinite(images).all():
      raise UsageError("the features have non-finite values: compute them with "
                       "tff_dpmed.models.feature_stage from the uint8 images")
  elif tuple(images.shape[1:]) != tuple(info.image_shape):
    raise UsageError(f"images have shape {images.shape[1:]} per example but the dataset info "
                     f"says {tuple(info.image_shape)}: pass the info that came with the images")
  want = (len(images), info.num_classes) if info.multi_label else (len(images),)
  if labels.shape != want:
    raise UsageError(f"labels have shape {labels.shape}, expected {want} for {len(images)} "
                     f"images of a {info.task} task: pass the labels that came with the images")
  if labels.dtype.kind not in "iub":
    raise UsageError(f"labels have dtype {labels.dtype}, expected integers: pass the labels "
                     "tff_dpmed.data loaded")
  # Out-of-range labels would only fail later, deep inside the loss.
  high = 2 if info.multi_label else info.num_classes
  if labels.size and (labels.min() < 0 or labels.max() >= high):
    raise UsageError(f"labels span [{labels.min()}, {labels.max()}], expected values in "
                     f"[0, {high}) for {info.name}: pass the labels that came with the images")


def _check_positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise UsageError(f"{name} must be a positive integer, got {value!r}: pass a whole "
                     f"number >= 1 (e.g. {_HINTS[name]})")
  return int(value)


def _flatten_partitions(partitions: Sequence[np.ndarray], num_examples: int):
  """Concatenated client indices and the offsets where each client starts."""
  if len(partitions) == 0:
    raise UsageError("no clients to build datasets for: pass at least one partition "
                     "(see tff_dpmed.data.partition)")
  sizes = np.array([len(p) for p in partitions], dtype=np.int64)
  if (sizes == 0).any():
    raise UsageError(f"client {int(np.flatnonzero(sizes == 0)[0])} has no examples: "
                     "partition with tff_dpmed.data.partition, which never leaves one empty")
  flat = np.concatenate([np.asarray(p) for p in partitions])
  if flat.dtype.kind not in "iu":
    raise UsageError(f"partition indices have dtype {flat.dtype}, expected integers: pass "
                     "the index arrays tff_dpmed.data.partition returns")
  if flat.min() < 0 or flat.max() >= num_examples:
    raise UsageError(f"partition indices span [{flat.min()}, {flat.max()}] but there are "
                     f"{num_examples} examples: partition the same array you pass here")
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  return flat.astype(np.int64), offsets


class _SharedArrays:
  """Arrays copied into TF once, then shared by every client's dataset.

  Eager calls (`create_tf_dataset_for_client`) all reuse one eager tensor per
  array, so building a client copies nothing. TFF serialises
  `dataset_computation` in a plain `tf.Graph`, which cannot capture eager
  tensors, so there the arrays become constants of that graph: the serialised
  computation then carries the data (fine for simulation-sized data, and the
  reason the eager path is the one to use for large data).
  """

  def __init__(self, **arrays: np.ndarray):
    self.nbytes = sum(v.nbytes for v in arrays.values())
    # Only the tensors are kept: the caller's NumPy arrays may be freed.
    self.tensors = {k: tf.convert_to_tensor(v) for k, v in arrays.items()}

  def get(self, name: str) -> tf.Tensor:
    if tf.executing_eagerly() or tf.inside_function():
      return self.tensors[name]
    if self.nbytes > MAX_EMBEDDED_BYTES:
      # Protobuf caps a serialised graph at 2 GB; fail with a reason, not a proto error.
      raise UsageError(
          f"the training data ({self.nbytes / 2**30:.2f} GiB) is too large to embed in TFF's "
          f"dataset_computation (limit {MAX_EMBEDDED_BYTES / 2**30:.0f} GiB): use a smaller "
          "--image_size or dataset, or build client datasets with "
          "create_tf_dataset_for_client")
    return tf.constant(self.tensors[name].numpy(), name=name)


def _client_options() -> tf.data.Options:
  """tf.data options of a client's pipeline.

  tf.data rewrites a pipeline's graph each time an iterator is made; a round
  makes one per client, and on pipelines this small the rewrite cost more
  than it saved (~8% of a round's CPU, benchmarks/LEVERS.md). The elements
  are the same either way.
  """
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  return options


def make_federated_train_data(images: np.ndarray, labels: np.ndarray,
                              partitions: Sequence[np.ndarray], info: DatasetInfo,
                              batch_size: int, epochs: int = 1, seed: int = 0,
                              shuffle_buffer: Optional[int] = None,
                              folder: Optional[str] = None
                              ) -> tff.simulation.datasets.ClientData:
  """One lazily built `tf.data.Dataset` per client, over shared arrays.

  Client ids are "0", "1", ... in the order of `partitions`. Each element is
  `OrderedDict(x=float32 (B, H, W, C) in [0, 1], y=int32 (B,))`, with `y`
  float32 `(B, K)` multi-hot for multi-label tasks. Given float32 features
  instead of uint8 images, `x` is the features as they are, `(B, h, w, c)`.

  Order of operations: shuffle -> repeat(epochs) -> batch(drop_remainder=False).
  So every epoch is a fresh permutation of the client's examples, a client
  yields ceil(n * epochs / batch_size) batches, and only the very last batch
  may be short (a batch may straddle two epochs).

  Args:
    images: uint8 `(N, H, W, C)` training images (e.g. `ImageSplits.train_images`),
      normalised by `preprocess_images` per batch; or float32 `(N, h, w, c)`
      features of them from a model's fixed feature stage
      (`tff_dpmed.models.feature_stage`), used unchanged.
    labels: int `(N,)` labels, or `(N, K)` 0/1 for multi-label.
    partitions: one index array into `images` per client (see `partition`);
      they may overlap (e.g. bootstrap samples), but none may be empty.
    info: the dataset's `DatasetInfo`.
    batch_size: examples per local batch.
    epochs: local passes over each client's data per round.
    seed: shuffling seed; a client's order depends only on (seed, client id)
      and is the same every time its dataset is created.
    shuffle_buffer: None shuffles each client completely (only int64 indices
      are buffered); a number limits the buffer.
    folder: a private directory the TFF worker can read: each client's
      examples are written there once, as stored (uint8 images or features),
      and its dataset reads them, so the computation carries file names, not
      the training set (which TFF's compiler copies many times: a 224-px set
      would not compile). None: the data are constants of the computation.

  Returns:
    A `tff.simulation.datasets.ClientData`; its `dataset_computation` works too.

  Raises:
    UsageError: inconsistent arrays, partitions, or non-positive sizes.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  _check_arrays(images, labels, info)
  batch_size = _check_positive("batch_size", batch_size)
  epochs = _check_positive("epochs", epochs)
  if shuffle_buffer is not None:
    shuffle_buffer = _check_positive("shuffle_buffer", shuffle_buffer)
  are_features = images.dtype == np.float32
  flat, offsets = _flatten_partitions(partitions, len(images))
  max_size = int(np.max(np.diff(offsets)))
  buffer = max_size if shuffle_buffer is None else min(shuffle_buffer, max_size)
  seed = int(seed)
  client_ids = [str(i) for i in range(len(offsets) - 1)]
  if folder is not None:
    own_examples = _clients_in_files(images, labels, flat, offsets, folder, client_ids)
  else:
    shared = _SharedArrays(images=images, labels=labels, flat=flat, offsets=offsets)

    def own_examples(client_id, client):
      del client_id
      # The arrays are fetched here, in the caller's graph, not inside `map`'s
      # function, whose captures must come from this outer graph. The client's
      # own examples are gathered before the pipeline, so that the dataset
      # captures only them. TFF's worker hands each client's dataset on as a
      # serialised graph holding every tensor the dataset captures: with all
      # images captured, that was a copy of the whole training set per client
      # per round (17 GB at 50 clients of a 10,000-client set).
      flat_t, offsets_t = shared.get("flat"), shared.get("offsets")
      indices = flat_t[offsets_t[client]:offsets_t[client + 1]]
      return (tf.gather(shared.get("images"), indices),
              tf.gather(shared.get("labels"), indices))

  def client_dataset(client_id) -> tf.data.Dataset:
    # Python str (eager) or tf.string scalar (inside dataset_computation).
    client = tf.strings.to_number(client_id, out_type=tf.int64)
    client_seed = tf.constant(seed, tf.int64) * _SEED_STRIDE + client
    client_images, client_labels = own_examples(client_id, client)

    def gather(positions):
      x = tf.gather(client_images, positions)
      return collections.OrderedDict(
          x=x if are_features else preprocess_images(x),
          y=preprocess_labels(tf.gather(client_labels, positions), info))

    # Shuffling positions 0..n-1 permutes exactly as shuffling the indices did.
    return (tf.data.Dataset.range(tf.shape(client_labels, out_type=tf.int64)[0])
            .shuffle(buffer, seed=client_seed, reshuffle_each_iteration=True)
            .repeat(epochs)
            .batch(batch_size, drop_remainder=False)
            .map(gather)
            .with_options(_client_options()))

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(client_ids, client_dataset)


def _write_client_file(folder: str, client: str, name: str, tensor) -> None:
  """One tensor of one client, `<folder>/<client>.<name>`, as a serialised proto."""
  tf.io.write_file(os.path.join(folder, f"{client}.{name}"),
                   tf.io.serialize_tensor(tf.convert_to_tensor(tensor)))


def _read_client_file(folder: str, client_id, name: str, spec: tf.TensorSpec) -> tf.Tensor:
  """What `_write_client_file` wrote, read on the worker; `client_id` a string scalar."""
  path = tf.strings.join([folder + os.sep, client_id, "." + name])
  return tf.ensure_shape(tf.io.parse_tensor(tf.io.read_file(path), spec.dtype), spec.shape)


def _clients_in_files(images: np.ndarray, labels: np.ndarray, flat: np.ndarray,
                      offsets: np.ndarray, folder: str, client_ids: list):
  """Writes each client's images and labels (as stored) to `folder`; returns the
  function that reads a client's back: (client_id, client) -> (images, labels)."""
  for i, client in enumerate(client_ids):
    indices = flat[offsets[i]:offsets[i + 1]]
    _write_client_file(folder, client, "x", images[indices])
    _write_client_file(folder, client, "y", labels[indices])
  x_spec = tf.TensorSpec([None, *images.shape[1:]], images.dtype)
  y_spec = tf.TensorSpec([None, *labels.shape[1:]], labels.dtype)

  def read(client_id, client):
    del client
    return (_read_client_file(folder, client_id, "x", x_spec),
            _read_client_file(folder, client_id, "y", y_spec))

  return read


def make_eval_dataset(images: np.ndarray, labels: np.ndarray, info: DatasetInfo,
                      batch_size: int) -> tf.data.Dataset:
  """Centralised evaluation data: same elements as training, unshuffled, one pass."""
  images, labels = np.asarray(images), np.asarray(labels)
  _check_arrays(images, labels, info)
  batch_size = _check_positive("batch_size", batch_size)
  return (tf.data.Dataset.from_tensor_slices((images, labels))
          .batch(batch_size, drop_remainder=False)
          .map(lambda x, y: collections.OrderedDict(x=preprocess_images(x),
                                                    y=preprocess_labels(y, info))))


def make_whole_client_data(images: np.ndarray, labels: np.ndarray,
                           partitions: Sequence[np.ndarray], info: DatasetInfo,
                           folder: Optional[str] = None,
                           canary: Optional[np.ndarray] = None
                           ) -> tff.simulation.datasets.ClientData:
  """One dataset per client holding a single element: all its examples and its id.

  For DP-SGD inside the clients (`privacy.example_dp`), which Poisson-samples
  every local batch itself: a batched pipeline would fix the batches the
  accountant assumes are random. The element is
  `OrderedDict(x=(n_k, H, W, C) float32, y=(n_k,) or (n_k, K), client=int64)`,
  with `x` and `y` as `make_federated_train_data` makes them.

  With `folder` (a private directory the TFF worker can read), each client's
  `x` and `y` are written there once and the worker reads its clients' files:
  the computation then carries file names, not all the data, every round
  (benchmarks/LEVERS.md: 3x less CPU per round for the scattering models).
  Without it the data are constants of the dataset computation.

  `canary` (int64, one per example; the example-level canary audit) adds a
  field `canary=(n_k,)` to the element: each example's canary coordinate, or
  -1 for a real example (`data.canary_examples`).
  """
  images, labels = np.asarray(images), np.asarray(labels)
  _check_arrays(images, labels, info)
  flat, offsets = _flatten_partitions(partitions, len(images))
  client_ids = [str(i) for i in range(len(offsets) - 1)]
  if canary is not None and np.shape(canary) != (len(images),):
    raise ValueError(f"canary has shape {np.shape(canary)}, expected ({len(images)},)")
  if folder is not None:
    return _whole_clients_from_files(images, labels, flat, offsets, info, folder, client_ids,
                                     canary)
  arrays = {} if canary is None else {"canary": np.asarray(canary, np.int64)}
  shared = _SharedArrays(images=images, labels=labels, flat=flat, offsets=offsets, **arrays)

  def client_dataset(client_id) -> tf.data.Dataset:
    images_t, labels_t = shared.get("images"), shared.get("labels")
    flat_t, offsets_t = shared.get("flat"), shared.get("offsets")
    client = tf.strings.to_number(client_id, out_type=tf.int64)
    indices = flat_t[offsets_t[client]:offsets_t[client + 1]]
    x = tf.gather(images_t, indices)
    element = collections.OrderedDict(
        x=model_inputs(x),
        y=preprocess_labels(tf.gather(labels_t, indices), info),
        client=client)
    if canary is not None:
      element["canary"] = tf.gather(shared.get("canary"), indices)
    return tf.data.Dataset.from_tensors(element)

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(client_ids, client_dataset)


PACK_SEPARATOR = ","


def pack_ids(client_ids: Sequence, pack_size: int) -> list[str]:
  """`client_ids` in packs of at most `pack_size` (as even as possible), each one
  TFF client id: the members' ids joined by PACK_SEPARATOR."""
  pack_size = _check_positive("pack_size", pack_size)
  ids = [str(int(i)) for i in client_ids]
  if not ids:
    return []
  count = -(-len(ids) // pack_size)
  return [PACK_SEPARATOR.join(p.tolist()) for p in np.array_split(np.array(ids), count)]


def make_packed_client_data(images: np.ndarray, labels: np.ndarray,
                            partitions: Sequence[np.ndarray], info: DatasetInfo,
                            folder: Optional[str] = None
                            ) -> tff.simulation.datasets.ClientData:
  """Datasets of packs of one-example clients (`privacy.packed_clients`).

  Every partition must hold one example (`--partition=per_example`). A pack's
  id is its members' client ids joined by PACK_SEPARATOR (`pack_ids`); its
  dataset holds one element, `OrderedDict(x=(m, ...), y=(m, ...))`, the m
  members' examples as `make_federated_train_data` makes them. The listed
  client ids are the single clients ("0", "1", ...), each a pack of one.

  With `folder` (a private directory the TFF worker can read), each client's
  `x` and `y` are written there once and a pack reads its members' files, so
  the computation carries no data (as `make_whole_client_data`'s).
  """
  images, labels = np.asarray(images), np.asarray(labels)
  _check_arrays(images, labels, info)
  flat, offsets = _flatten_partitions(partitions, len(images))
  if len(flat) != len(offsets) - 1:
    raise UsageError("packed clients need one example per client, but some clients hold "
                     "more: use --partition=per_example, or --client_packing=off")
  client_ids = [str(i) for i in range(len(offsets) - 1)]
  if folder is not None:
    return _packs_from_files(images, labels, flat, info, folder, client_ids)
  shared = _SharedArrays(images=images, labels=labels, flat=flat)

  def pack_dataset(pack_id) -> tf.data.Dataset:
    images_t, labels_t, flat_t = shared.get("images"), shared.get("labels"), shared.get("flat")
    indices = tf.gather(flat_t, _pack_members(pack_id))
    return tf.data.Dataset.from_tensors(collections.OrderedDict(
        x=model_inputs(tf.gather(images_t, indices)),
        y=preprocess_labels(tf.gather(labels_t, indices), info)))

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(client_ids, pack_dataset)


def _pack_members(pack_id) -> tf.Tensor:
  return tf.strings.to_number(tf.strings.split(pack_id, PACK_SEPARATOR), out_type=tf.int64)


def _packs_from_files(images, labels, flat, info, folder: str, client_ids: list
                      ) -> tff.simulation.datasets.ClientData:
  """`make_packed_client_data`, each client's one example in `folder` (its image or
  features and its label as stored, serialised protos; normalised when read)."""
  for client, index in zip(client_ids, flat):
    _write_client_file(folder, client, "x", images[index])
    _write_client_file(folder, client, "y", labels[index])
  specs = {"x": tf.TensorSpec(images.shape[1:], images.dtype),
           "y": tf.TensorSpec(labels.shape[1:], labels.dtype)}

  def pack_dataset(pack_id) -> tf.data.Dataset:
    members = tf.strings.as_string(_pack_members(pack_id))

    def read(name):
      return tf.map_fn(lambda member: _read_client_file(folder, member, name, specs[name]),
                       members, fn_output_signature=specs[name])
    return tf.data.Dataset.from_tensors(collections.OrderedDict(
        x=model_inputs(read("x")), y=preprocess_labels(read("y"), info)))

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(client_ids, pack_dataset)


def _whole_clients_from_files(images, labels, flat, offsets, info, folder: str,
                              client_ids: list, canary: Optional[np.ndarray] = None
                              ) -> tff.simulation.datasets.ClientData:
  """`make_whole_client_data`, each client's tensors in `folder` as serialised protos."""
  dtypes = {}
  for i, client in enumerate(client_ids):
    indices = flat[offsets[i]:offsets[i + 1]]
    x = images[indices]
    tensors = {"x": model_inputs(x),
               "y": preprocess_labels(labels[indices], info)}
    if canary is not None:
      tensors["canary"] = tf.constant(canary[indices], tf.int64)
    for name, tensor in tensors.items():
      dtypes[name] = tensor.dtype
      _write_client_file(folder, client, name, tensor)
  shapes = {"x": [None, *images.shape[1:]], "y": [None, *labels.shape[1:]], "canary": [None]}

  def client_dataset(client_id) -> tf.data.Dataset:
    def read(name):
      return _read_client_file(folder, client_id, name, tf.TensorSpec(shapes[name],
                                                                      dtypes[name]))
    element = collections.OrderedDict(
        x=read("x"), y=read("y"), client=tf.strings.to_number(client_id, out_type=tf.int64))
    if canary is not None:
      element["canary"] = read("canary")
    return tf.data.Dataset.from_tensors(element)

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(client_ids, client_dataset)


def any_client_size(element_type) -> collections.OrderedDict:
  """`make_whole_client_data`'s (or `make_packed_client_data`'s) element type for every
  client, not only the first.

  TFF reads the element type off one client's dataset, whose example count
  is static there; the computation must take any count.
  """
  relax = lambda spec: tf.TensorSpec([None] + spec.shape[1:], spec.dtype)
  return collections.OrderedDict(
      (name, spec if name == "client" else relax(spec)) for name, spec in element_type.items())
