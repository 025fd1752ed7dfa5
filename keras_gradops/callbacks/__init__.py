"""Keras callbacks that look at the gradient during training."""

from keras_gradops.callbacks.gradient_stats import GradientStatsRecorder, plot_gradient_stats

__all__ = ["GradientStatsRecorder", "plot_gradient_stats"]
