"""Centralised evaluation of the global model on the val or test split."""

import numpy as np
from sklearn import metrics as sk_metrics
import tensorflow as tf

from tff_dpmed import models
from tff_dpmed.data.preprocess import model_inputs, preprocess_images
from tff_dpmed.data.types import DatasetInfo


def predict_probabilities(keras_model: tf.keras.Model, info: DatasetInfo,
                          images: np.ndarray, batch_size: int = 512) -> np.ndarray:
  out = []
  for start in range(0, len(images), batch_size):
    x = preprocess_images(images[start:start + batch_size])
    out.append(models.probabilities(info, keras_model(x, training=False)).numpy())
  return np.concatenate(out) if out else np.zeros((0, info.num_classes), np.float32)


def classification_metrics(info: DatasetInfo, labels: np.ndarray, probs: np.ndarray) -> dict:
  """Accuracy and AUC: binary AUC on the positive class, macro one-vs-rest otherwise."""
  if info.multi_label:
    accuracy = float(np.mean((probs > 0.5) == labels.astype(bool)))
    present = [k for k in range(info.num_classes) if 0 < labels[:, k].sum() < len(labels)]
    auc = float(np.mean([sk_metrics.roc_auc_score(labels[:, k], probs[:, k]) for k in present])) \
        if present else float("nan")
    return {"accuracy": accuracy, "auc": auc}
  accuracy = float(np.mean(np.argmax(probs, axis=1) == labels))
  classes_present = np.unique(labels)
  if len(classes_present) < 2:
    auc = float("nan")  # AUC is undefined with a single class present.
  elif info.num_classes == 2:
    auc = float(sk_metrics.roc_auc_score(labels, probs[:, 1]))
  else:
    # Renormalise in case float error leaves rows summing to 1 +- 1e-7.
    p = probs / probs.sum(axis=1, keepdims=True)
    auc = float(sk_metrics.roc_auc_score(labels, p, multi_class="ovr", average="macro",
                                         labels=np.arange(info.num_classes))) \
        if len(classes_present) == info.num_classes else float("nan")
  return {"accuracy": accuracy, "auc": auc}


def evaluate(keras_model, info: DatasetInfo, images, labels) -> dict:
  """Accuracy, AUC and the training loss (from the logits, so it does not saturate)."""
  loss_fn = models.loss_for(info)
  probs, loss_sum = [], 0.0
  for start in range(0, len(images), 512):
    logits = keras_model(model_inputs(images[start:start + 512]), training=False)
    batch = labels[start:start + 512]
    target = batch.astype(np.float32) if info.multi_label else batch
    loss_sum += float(loss_fn(target, logits)) * len(batch)
    probs.append(models.probabilities(info, logits).numpy())
  probs = np.concatenate(probs) if probs else np.zeros((0, info.num_classes), np.float32)
  result = classification_metrics(info, labels, probs)
  result["loss"] = loss_sum / len(images) if len(images) else float("nan")
  return result
