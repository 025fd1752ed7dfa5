"""Custom train steps that apply gradient ops, log gradient telemetry and skip bad steps."""

from keras_gradops.training.gradient_ops_model import GradientOpsModel
from keras_gradops.training.options import GradientOps
from keras_gradops.training.wrapper import GradientWrapperModel

__all__ = ["GradientOps", "GradientOpsModel", "GradientWrapperModel"]
