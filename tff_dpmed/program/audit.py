"""Membership-inference audit of a trained model, with TF Privacy's attacks.

An empirical check, not a guarantee: it asks whether an attacker who sees the
model's outputs on an example can tell a *training* example (member) from a
*held-out* one (non-member). Members are examples of the train split;
non-members are examples of the test split, which training never touches. The
two sets are subsampled to the same size (at most `max_examples` each) with
`seed`, so an AUC of 0.5 means the attacks do no better than chance.

Attacks (`tensorflow_privacy.privacy.privacy_tests.membership_inference_attack`):

- THRESHOLD_ATTACK: thresholds the per-example loss (Yeom et al. 2018);
- THRESHOLD_ENTROPY_ATTACK: thresholds the modified prediction entropy (Song &
  Mittal 2021); single-label tasks only;
- LOGISTIC_REGRESSION: a classifier on (logits, loss), trained and scored with
  cross-validation, so no example is scored by an attacker that trained on it.

`attack_auc` and `attacker_advantage` (max over thresholds of TPR - FPR) are
the maxima over the attacks run; `attacks` holds each attack's own figures.

Multi-label tasks (e.g. ChestMNIST): the loss is the binary cross-entropy
summed over labels, and the attacks see (logits, summed loss) without the
labels, so TF Privacy's per-label multi-label mode is not used; the entropy
attack is skipped (it assumes one softmax).

What this does and does not measure. The DP guarantee of tff_dpmed is at the
*client* level (a whole hospital), and its epsilon bounds *every* attack on
that unit. This audit attacks single *examples* with a handful of standard
attacks: a low AUC is evidence that these attacks fail, not a proof of
privacy, and an AUC above 0.5 on a DP model does not contradict the reported
epsilon (which is usually far above what such AUCs imply). It is most useful
for comparing runs: no DP against central against local, and across noise.
"""

import contextlib
import json
import os
from typing import Optional, Sequence

import numpy as np
from scipy import special
from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack import (
    data_structures as mia_data)
from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack import (
    membership_inference_attack as mia)

from tff_dpmed.data import registry
from tff_dpmed.data.preprocess import preprocess_images
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.files import write_json_atomic
from tff_dpmed.program import artifacts

AttackType = mia_data.AttackType
DEFAULT_ATTACKS = ("THRESHOLD_ATTACK", "THRESHOLD_ENTROPY_ATTACK", "LOGISTIC_REGRESSION")
# Below this many members (and non-members) the trained attacks' nested
# cross-validation cannot run and AUCs are meaningless.
MIN_EXAMPLES = 10
AUDIT_FILE = "audit.json"


def model_logits(keras_model, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
  """The model's logits `(N, num_classes)` for uint8 images, preprocessed as in training."""
  out = []
  for start in range(0, len(images), batch_size):
    x = preprocess_images(images[start:start + batch_size])
    out.append(np.asarray(keras_model(x, training=False), dtype=np.float64))
  return np.concatenate(out) if out else np.zeros((0, 0))


def per_example_loss(info: DatasetInfo, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The training loss of each example, `(N,)`, in float64.

  Softmax cross-entropy for single-label tasks; binary cross-entropy summed
  over labels for multi-label tasks (what `models.loss_for` averages).
  """
  logits = np.asarray(logits, np.float64)
  if info.multi_label:
    y = np.asarray(labels, np.float64)
    # Stable BCE with logits: max(z, 0) - z*y + log(1 + exp(-|z|)).
    bce = np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))
    return bce.sum(axis=1)
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  return -special.log_softmax(logits, axis=1)[np.arange(len(labels)), labels]


def _attack_types(names: Optional[Sequence[str]], multi_label: bool) -> list:
  names = list(names or DEFAULT_ATTACKS)
  known = {t.name for t in AttackType}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise UsageError(f"unknown membership-inference attack(s) {', '.join(unknown)}: use "
                     f"{', '.join(sorted(known))}")
  if multi_label:
    names = [n for n in names if n != AttackType.THRESHOLD_ENTROPY_ATTACK.name]
  return [AttackType[n] for n in names]


@contextlib.contextmanager
def _numpy_global_seed(seed: int):
  """TF Privacy's trained attacks shuffle with np.random; seed it, then restore it."""
  state = np.random.get_state()
  np.random.seed(seed)
  try:
    yield
  finally:
    np.random.set_state(state)


def _subsample(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
  return np.sort(rng.choice(n_total, size=n, replace=False))


def _stratified_counts(train_counts: np.ndarray, test_counts: np.ndarray,
                       max_examples: int) -> np.ndarray:
  """Per-class sizes that both sets can supply, scaled down to at most max_examples in all."""
  counts = np.minimum(train_counts, test_counts)
  total = int(counts.sum())
  if total <= max_examples:
    return counts
  exact = counts * (max_examples / total)
  out = np.floor(exact).astype(np.int64)
  # Hand the remainder to the largest fractional parts, so the total is max_examples.
  for k in np.argsort(-(exact - out), kind="stable")[:max_examples - int(out.sum())]:
    out[k] += 1
  return out


def _choose_examples(train_labels, test_labels, num_classes: int, multi_label: bool,
                     max_examples: int, stratify: bool, rng: np.random.Generator):
  """Indices of members (into train) and non-members (into test), equally many."""
  if stratify and not multi_label:
    y_train = np.asarray(train_labels).reshape(-1).astype(np.int64)
    y_test = np.asarray(test_labels).reshape(-1).astype(np.int64)
    counts = _stratified_counts(np.bincount(y_train, minlength=num_classes),
                                np.bincount(y_test, minlength=num_classes), max_examples)
    members, nonmembers = [], []
    for k, n_k in enumerate(counts):
      if n_k:
        members.append(rng.choice(np.flatnonzero(y_train == k), size=n_k, replace=False))
        nonmembers.append(rng.choice(np.flatnonzero(y_test == k), size=n_k, replace=False))
    if not members:
      return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.sort(np.concatenate(members)), np.sort(np.concatenate(nonmembers))
  n = min(len(train_labels), len(test_labels), max_examples)
  return _subsample(len(train_labels), n, rng), _subsample(len(test_labels), n, rng)


def membership_inference_audit(keras_model, info: DatasetInfo,
                               train_images: np.ndarray, train_labels: np.ndarray,
                               test_images: np.ndarray, test_labels: np.ndarray, *,
                               max_examples: int = 2000, seed: int = 0,
                               stratify: bool = True,
                               attack_types: Optional[Sequence[str]] = None) -> dict:
  """Runs membership-inference attacks on `keras_model`; returns a JSON-ready dict.

  Args:
    keras_model: a Keras model mapping preprocessed images to logits (as
      `tff_dpmed.models.build_model` builds, e.g. from
      `artifacts.load_trained_model`).
    info: the dataset's info.
    train_images, train_labels: the examples the model was trained on (members).
    test_images, test_labels: held-out examples (non-members).
    max_examples: cap on members and on non-members; both sets get equally many.
    seed: seeds the subsampling and the trained attacks' shuffling.
    stratify: single-label tasks: members and non-members get the same number
      of examples of each class (min of the two splits' counts, scaled down to
      `max_examples`). Without it, a train/test difference in class balance
      alone (PneumoniaMNIST: 74% vs 62% pneumonia) lets a model that learnt
      nothing but the majority class "tell" members from non-members.
      Multi-label tasks are never stratified.
    attack_types: AttackType names; default `DEFAULT_ATTACKS`.

  Returns:
    {"attack_auc", "attacker_advantage": maxima over attacks; "best_attack";
     "attacks": {name: {"auc", "attacker_advantage", "ppv"}}; "num_members",
     "num_nonmembers"; mean loss and accuracy of each set; settings}.

  Raises:
    UsageError: too few examples, or an unknown attack name.
  """
  if max_examples < MIN_EXAMPLES:
    raise UsageError(f"max_examples={max_examples} is too small for an audit: use at least "
                     f"{MIN_EXAMPLES}")
  types = _attack_types(attack_types, info.multi_label)
  rng = np.random.default_rng(seed)
  member_idx, nonmember_idx = _choose_examples(train_labels, test_labels, info.num_classes,
                                               info.multi_label, max_examples, stratify, rng)
  n = len(member_idx)
  if n < MIN_EXAMPLES:
    raise UsageError(f"a membership-inference audit needs at least {MIN_EXAMPLES} training and "
                     f"{MIN_EXAMPLES} held-out examples (of the same classes); got "
                     f"{len(train_images)} and {len(test_images)}, {n} usable")
  y_in, y_out = np.asarray(train_labels)[member_idx], np.asarray(test_labels)[nonmember_idx]
  logits_in = model_logits(keras_model, train_images[member_idx])
  logits_out = model_logits(keras_model, test_images[nonmember_idx])
  loss_in = per_example_loss(info, logits_in, y_in)
  loss_out = per_example_loss(info, logits_out, y_out)

  if info.multi_label:
    # (logits, summed loss) only: see the module docstring.
    attack_input = mia_data.AttackInputData(logits_train=logits_in, logits_test=logits_out,
                                            loss_train=loss_in, loss_test=loss_out)
  else:
    attack_input = mia_data.AttackInputData(
        logits_train=logits_in, logits_test=logits_out,
        labels_train=y_in.astype(np.int64).reshape(-1),
        labels_test=y_out.astype(np.int64).reshape(-1),
        loss_train=loss_in, loss_test=loss_out)
  # TF Privacy also computes epsilon lower bounds (not reported here: they are
  # example-level, while tff_dpmed's guarantee is client-level); they divide
  # by zero for perfect attacks and warn.
  with _numpy_global_seed(seed), np.errstate(divide="ignore", invalid="ignore"):
    results = mia.run_attacks(attack_input,
                              mia_data.SlicingSpec(entire_dataset=True, by_class=False),
                              attack_types=types)

  attacks = {}
  for r in results.single_attack_results:
    attacks[r.attack_type.name] = {"auc": float(r.get_auc()),
                                   "attacker_advantage": float(r.get_attacker_advantage()),
                                   "ppv": float(r.get_ppv())}
  if not attacks:
    raise UsageError("no membership-inference attack could run on these examples: "
                     "use more examples (max_examples) or other attack types")
  best = max(attacks, key=lambda k: attacks[k]["auc"])
  return {
      "attack_auc": max(a["auc"] for a in attacks.values()),
      "attacker_advantage": max(a["attacker_advantage"] for a in attacks.values()),
      "best_attack": best,
      "attacks": attacks,
      "num_members": int(n),
      "num_nonmembers": int(n),
      "mean_loss_members": float(np.mean(loss_in)),
      "mean_loss_nonmembers": float(np.mean(loss_out)),
      "accuracy_members": _accuracy(info, logits_in, y_in),
      "accuracy_nonmembers": _accuracy(info, logits_out, y_out),
      "seed": int(seed),
      "max_examples": int(max_examples),
      "stratified": bool(stratify and not info.multi_label),
      "membership_unit": "example",
      "members": "train split", "nonmembers": "test split",
  }


def _accuracy(info: DatasetInfo, logits: np.ndarray, labels: np.ndarray) -> float:
  if info.multi_label:
    return float(np.mean((logits > 0) == np.asarray(labels).astype(bool)))
  return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels).reshape(-1)))


NONMEMBER_SPLITS = ("test", "val")


def audit_run(run_dir: str, splits=None, *, max_examples: int = 2000, seed: int = 0,
              stratify: bool = True, nonmember_split: str = "test",
              attack_types: Optional[Sequence[str]] = None, write: bool = True) -> dict:
  """Audits the final model of the finished run in `run_dir`; writes `<run_dir>/audit.json`.

  Args:
    run_dir: a run folder holding summary.json and final_weights.npz.
    splits: the run's `ImageSplits` (e.g. `trainer.prepare(cfg).splits`). If
      None they are loaded again from the run's recorded dataset config,
      without downloading.
    max_examples, seed, stratify, attack_types: as for `membership_inference_audit`.
    nonmember_split: "test" (never touched by training) or "val" (never trained
      on, but used to pick the best round). MedMNIST's val split comes from the
      same source as train, while some test splits are shifted (PneumoniaMNIST):
      a shift lets the attacks tell the splits apart without any memorisation.
    write: write the result to `<run_dir>/audit.json`.
  """
  if nonmember_split not in NONMEMBER_SPLITS:
    raise UsageError(f"nonmember_split={nonmember_split!r}: use one of "
                     f"{', '.join(NONMEMBER_SPLITS)}")
  keras_model, info, metadata = artifacts.load_trained_model(run_dir)
  if splits is None:
    config = metadata["training_config"]
    splits = registry.load_dataset(config["dataset"], image_size=config["image_size"],
                                   data_dir=config["data_dir"], download=False,
                                   seed=config["seed"] or 0)
  if tuple(splits.info.image_shape) != tuple(info.image_shape) or \
      splits.info.num_classes != info.num_classes:
    raise UsageError(f"the data given for auditing {run_dir} ({splits.info.name}, "
                     f"{splits.info.image_shape}) is not what the run was trained on "
                     f"({info.name}, {info.image_shape})")
  result = membership_inference_audit(
      keras_model, info, splits.train_images, splits.train_labels,
      getattr(splits, f"{nonmember_split}_images"), getattr(splits, f"{nonmember_split}_labels"),
      max_examples=max_examples, seed=seed, stratify=stratify, attack_types=attack_types)
  result["nonmembers"] = f"{nonmember_split} split"
  result["run_dir"] = run_dir
  result["privacy"] = metadata["privacy"]
  if write:
    write_json_atomic(os.path.join(run_dir, AUDIT_FILE), result)
  return result


def load_audit(run_dir: str) -> Optional[dict]:
  """The audit.json of `run_dir`, or None if there is none."""
  path = os.path.join(run_dir, AUDIT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def format_result(result: dict) -> str:
  """One line for a CLI: the maxima and each attack's AUC."""
  per = ", ".join(f"{k.lower()} {v['auc']:.3f}" for k, v in sorted(result["attacks"].items()))
  return (f"membership-inference audit: attack AUC {result['attack_auc']:.4f}  attacker "
          f"advantage {result['attacker_advantage']:.4f}  ({result['num_members']} members vs "
          f"{result['num_nonmembers']} held-out; {per})")
