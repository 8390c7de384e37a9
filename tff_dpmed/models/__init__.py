"""Keras image classifiers. Every model maps float32 images in [0, 1],
shape (batch, H, W, C), to logits of shape (batch, num_classes)."""

from tff_dpmed.models.registry import (MODEL_NAMES, build_model, build_trainable, feature_stage,
                                       loss_for, probabilities)

__all__ = ["MODEL_NAMES", "build_model", "build_trainable", "feature_stage", "loss_for",
           "probabilities"]
