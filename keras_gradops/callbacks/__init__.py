"""Keras callbacks that look at the gradient during training, or keep it going across workers."""

from keras_gradops.callbacks.backup import MultiWorkerBackupAndRestore
from keras_gradops.callbacks.gradient_stats import GradientStatsRecorder, plot_gradient_stats

__all__ = ["GradientStatsRecorder", "MultiWorkerBackupAndRestore", "plot_gradient_stats"]
