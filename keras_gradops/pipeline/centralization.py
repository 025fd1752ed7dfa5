"""Which weights gradient centralization changes, and over which axes.

Yong et al., "Gradient Centralization", ECCV 2020 (arXiv:2004.01461):
``g_i <- g_i - mean(g_i)`` over the incoming weights of each output unit.
Two separate questions, each answered in one place:

- *layout* (:mod:`keras_gradops.fan_in`): a weight's fan-in axes, or ``None``
  when it has no per-unit fan-in (biases, embeddings, per-element scales);
- *selection* (:class:`CentralizationSelection`): which of the weights with
  a fan-in are centralized. Every weight of rank >= 2, except with
  ``conv_only`` (the reference ``GCC`` optimizers: rank >= 4, convolution
  kernels) and those excluded by :meth:`CentralizationSelection.exclude`
  (by variable, or by a regular expression searched in the name, as Keras'
  ``exclude_from_weight_decay``). A unit with a single incoming weight is
  never centralized (it would zero its gradient).

Example:
    >>> kernel = keras.Variable(np.zeros((3, 3, 8, 16)), name="kernel")   # Conv2D (h, w, in, out)
    >>> dense = keras.Variable(np.zeros((8, 4)), name="dense_kernel")
    >>> selection = CentralizationSelection(conv_only=True)
    >>> selection.axes(kernel, (0, 1, 2)), selection.axes(dense, (0,))
    ((0, 1, 2), None)
    >>> selection = CentralizationSelection()
    >>> selection.exclude(var_names=["dense"])
    >>> selection.axes(dense, (0,))
"""

import math
import re

CONV_MIN_RANK = 4
"""``conv_only`` centralizes weights of rank >= 4, as the reference ``_GCC``
optimizers do (``len(p.shape) > 3``): Conv2D/3D and their variants."""


class CentralizationSelection:
    """The weights a chain centralizes.

    Args:
        conv_only: centralize convolution kernels only (rank >= 4).
    """

    def __init__(self, conv_only=False):
        self.conv_only = conv_only
        self._excluded_ids = set()
        self._excluded_pattern = None

    def exclude(self, var_list=None, var_names=None):
        """Never centralize these weights.

        Args:
            var_list: variables to exclude.
            var_names: strings; a variable whose name matches one
                (``re.search``, as Keras' ``exclude_from_weight_decay``) is
                excluded.
        """
        self._excluded_ids |= {id(v) for v in var_list or ()}
        names = list(var_names or ())
        if names:
            self._excluded_pattern = re.compile("|".join(names))

    def is_excluded(self, variable):
        if id(variable) in self._excluded_ids:
            return True
        return self._excluded_pattern is not None and self._excluded_pattern.search(variable.name) is not None

    def axes(self, variable, unit_axes):
        """The axes ``variable``'s gradient is centralized over, or ``None`` to leave it.

        Args:
            variable: the weight.
            unit_axes: its fan-in axes from :func:`keras_gradops.fan_in.unit_axes`.
        """
        rank = len(variable.shape)
        if not unit_axes or rank <= 1 or (self.conv_only and rank < CONV_MIN_RANK):
            return None
        if self.is_excluded(variable) or math.prod(variable.shape[a] for a in unit_axes) <= 1:
            return None
        return tuple(unit_axes)
