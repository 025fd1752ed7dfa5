"""Wrapper models whose train step runs the gradient chain, logs gradient telemetry and skips bad steps."""

from keras_gradops.training.gradient_ops_model import GradientOpsModel, GradientWrapperModel

__all__ = ["GradientOpsModel", "GradientWrapperModel"]
