"""Custom train steps that run the gradient chain, log gradient telemetry and skip bad steps."""

from keras_gradops.training.gradient_ops_model import GradientOpsModel
from keras_gradops.training.wrapper import GradientWrapperModel

__all__ = ["GradientOpsModel", "GradientWrapperModel"]
