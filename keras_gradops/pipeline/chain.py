"""The gradient chain: clip, then L2, then centralize, on the gradient summed over replicas.

Per step, for the aggregated gradient ``g`` and the weights ``w``:

1. clipping (:mod:`.clipping`), at most one rule, which needs every gradient
   at once (the global norm ``n = sqrt(sum_i ||g_i||^2)`` is recorded before);
2. L2 weight decay ``g_i <- g_i + wd * w_i`` (the reference ``SGD_GC`` /
   ``Adam_GC`` put it in the gradient, before centralization);
3. gradient centralization ``g_i <- g_i - mean(g_i)`` per output unit
   (:mod:`.centralization`; Yong et al., ECCV 2020, arXiv:2004.01461).

Steps 2 and 3 act on one weight at a time, so an optimizer runs them in its
``update_step`` and the wrapper models right after step 1. The non-finite
guard (:mod:`.guard`) runs before all of them.

Example:
    >>> from keras_gradops.pipeline.clipping import GlobalNormClipping
    >>> chain = GradientChain(GlobalNormClipping(1.0), centralize=True)
    >>> w = [keras.Variable(np.zeros((2, 2))), keras.Variable(np.zeros(2))]
    >>> chain.build(w)
    >>> g, stats = chain([tf.constant([[3.0, 0.0], [1.0, 0.0]]), tf.constant([0.0, 0.0])], w, [0, 1])
    >>> float(stats.norm), bool(stats.clipped)  # sqrt(3^2 + 1^2)
    (3.1622776985168457, True)
    >>> [[round(float(v), 4) for v in row] for row in g[0].numpy()]  # clipped to norm 1, column means removed
    [[0.3162, 0.0], [-0.3162, 0.0]]
"""

import dataclasses

import tensorflow as tf

from keras_gradops import fan_in
from keras_gradops.arguments import check_bool, check_fan_in_axes, check_non_negative
from keras_gradops.ops import centralize as centralize_tensor
from keras_gradops.ops import global_norm
from keras_gradops.pipeline.centralization import CentralizationSelection
from keras_gradops.pipeline.clipping import Clipping


@dataclasses.dataclass
class StepStatistics:
    """What step 1 saw.

    Attributes:
        norm: the pre-clip global norm of the aggregated gradient (float32).
        clipped: bool scalar, whether clipping changed the gradient.
        threshold: the global-norm threshold in force (float32), or ``None``
            when the rule is not global-norm clipping.
    """

    norm: tf.Tensor
    clipped: tf.Tensor
    threshold: tf.Tensor | None


class GradientChain:
    """Clipping, L2 and centralization of the aggregated gradient, built for a list of weights.

    Args:
        clipping: a :class:`~keras_gradops.pipeline.clipping.Clipping` rule.
        centralize: whether to centralize (step 3).
        conv_only: with ``centralize``, convolution kernels only (rank >= 4).
        fan_in_axes: optional ``{variable.path: axes or None}`` mapping (see
            :mod:`keras_gradops.fan_in`), checked against the weights' ranks
            when built.
        l2: L2 weight decay ``wd`` of step 2, or ``None``.

    Raises:
        ValueError: a malformed option; ``conv_only`` without ``centralize``.
    """

    def __init__(self, clipping=None, centralize=False, conv_only=False, fan_in_axes=None, l2=None):
        check_bool(centralize, "centralize")
        check_bool(conv_only, "conv_only")
        if conv_only and not centralize:
            raise ValueError(
                "`conv_only=True` chooses which weights are centralized; it needs "
                "`centralize=True`. Received: centralize=False, conv_only=True"
            )
        if l2 is not None:
            check_non_negative(l2, "weight_decay")
        self.clipping = clipping or Clipping()
        self.centralize = centralize
        self.selection = CentralizationSelection(conv_only)
        self.fan_in_axes = check_fan_in_axes(fan_in_axes)
        self.l2 = l2 or None
        self.built = False

    @property
    def conv_only(self):
        return self.selection.conv_only

    def build(self, variables, add_state=None, model=None, decays=None):
        """Resolves each weight's axes and L2 once, and creates the clipping rule's state.

        Args:
            variables: the weights, in the order indices refer to.
            add_state: ``(name, shape, dtype, initializer) -> variable``,
                for adaptive thresholds.
            model: the model the weights belong to, if known (else their
                layers are looked up among the live layers).
            decays: ``variable -> bool``, whether L2 applies to a weight
                (Keras' ``exclude_from_weight_decay``); default all.
        """
        unit_axes = fan_in.unit_axes(variables, self.fan_in_axes, model)
        self._unit_axes = unit_axes
        self._gc_axes = [self.selection.axes(v, axes) for v, axes in zip(variables, unit_axes)]
        self._l2 = [self.l2 if self.l2 and (decays is None or decays(v)) else None for v in variables]
        if add_state is not None:
            self.clipping.build(add_state)
        self.built = True

    def exclude_from_centralization(self, var_list=None, var_names=None):
        """Never centralize these weights; before :meth:`build`.

        Args:
            var_list: variables to exclude.
            var_names: strings; a variable whose name matches one
                (``re.search``, as Keras' ``exclude_from_weight_decay``) is excluded.

        Raises:
            ValueError: the chain is already built (training has started).
        """
        if self.built:
            raise ValueError("`exclude_from_centralization()` must be called before the optimizer is built (before training starts).")
        self.selection.exclude(var_list, var_names)

    def centralization_axes(self, index):
        """The axes weight ``index`` is (or, with ``centralize=False``, would be) centralized over, or ``None``."""
        return self._gc_axes[index]

    def clip(self, gradients, variables, indices):
        """Step 1 on ``None``-free lists; ``indices`` place each entry in the built weights."""
        norm = global_norm(gradients)
        threshold = self.clipping.threshold(norm)
        unit_axes = [self._unit_axes[i] for i in indices]
        gradients, clipped = self.clipping(gradients, variables, unit_axes, norm, threshold)
        return list(gradients), StepStatistics(norm, clipped, threshold)

    def finish(self, gradient, variable, index):
        """Steps 2 and 3 for one weight: ``GC(g + wd * w)``."""
        l2 = self._l2[index]
        if l2 is not None:
            # A sparse gradient becomes dense: so is the L2 term.
            gradient = tf.convert_to_tensor(gradient) + tf.cast(l2, variable.dtype) * variable
        return centralize_tensor(gradient, self._gc_axes[index]) if self.centralize else gradient

    def __call__(self, gradients, variables, indices):
        """All three steps; returns ``(gradients, StepStatistics)``."""
        gradients, statistics = self.clip(gradients, variables, indices)
        finished = [self.finish(g, v, i) for g, v, i in zip(gradients, variables, indices)]
        return finished, statistics

    def config(self):
        """The chain's options as constructor arguments."""
        return {
            **self.clipping.config(),
            "centralize": self.centralize,
            "conv_only": self.conv_only,
            "fan_in_axes": self.fan_in_axes,
        }
