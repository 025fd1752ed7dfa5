"""Keras optimizers with gradient centralization and aggregated-gradient clipping."""

from keras_gradops.optimizers.adagrad import AdagradGC, AdagradGCC
from keras_gradops.optimizers.adam import AdamGC, AdamGCC, AdamWGC, AdamWGCC
from keras_gradops.optimizers.centralized import centralized_class, with_gradient_centralization
from keras_gradops.optimizers.base import GradientChainMixin
from keras_gradops.optimizers.sgd import SGDGC, SGDGCC, SGDWGC, SGDWGCC

__all__ = [
    "AdagradGC", "AdagradGCC", "AdamGC", "AdamGCC", "AdamWGC", "AdamWGCC",
    "GradientChainMixin", "SGDGC", "SGDGCC", "SGDWGC", "SGDWGCC",
    "centralized_class", "with_gradient_centralization",
]
