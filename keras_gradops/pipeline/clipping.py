"""The clipping rule of a gradient chain: at most one of four, on the aggregated gradient.

Each rule wraps one op of :mod:`keras_gradops.ops` and reports whether it
changed the gradient this step (the ``clipped_fraction`` telemetry):

| option | rule | op |
|---|---|---|
| ``global_clipnorm=c`` | ``g_i <- g_i * c / max(n, c)``, ``n`` the global norm | ``clip_by_global_norm`` |
| ``clipnorm=c`` | each tensor: ``g <- g * c / max(||g||, c)`` | ``clip_by_norm`` |
| ``clipvalue=c`` | each element to ``[-c, c]`` | ``clip_by_value`` |
| ``adaptive_clipping=lam`` | AGC per output unit: ``||G_i|| <= lam * max(||W_i||, eps)`` | ``adaptive_clip`` |

``global_clipnorm`` also takes a threshold that adapts to the history of
the norm (:mod:`keras_gradops.thresholds`), whose state lives in variables.

Example:
    >>> rule = clipping_from_options(global_clipnorm=1.0)
    >>> g = [tf.constant([3.0, 0.0]), tf.constant([4.0])]
    >>> norm = tf.constant(5.0)
    >>> clipped, changed = rule(g, [None, None], [None, None], norm, rule.threshold(norm))
    >>> [[round(float(v), 4) for v in c.numpy()] for c in clipped], bool(changed)
    ([[0.6, 0.0], [0.8]], True)
    >>> rule = clipping_from_options(clipvalue=0.5)
    >>> clipped, changed = rule(g, [None, None], [None, None], norm, rule.threshold(norm))
    >>> [c.numpy().tolist() for c in clipped], rule.threshold(norm)
    ([[0.5, 0.0], [0.5]], None)
"""

import tensorflow as tf

from keras_gradops.arguments import check_optional_positive, check_positive
from keras_gradops.ops import clip_by_norm, clip_by_value
from keras_gradops.ops.adaptive_clipping import clip_unitwise
from keras_gradops.ops._dtypes import map_values, to_float32, values_of
from keras_gradops.thresholds import AdaptiveThreshold, deserialize_threshold

OPTIONS = ("global_clipnorm", "clipnorm", "clipvalue", "adaptive_clipping")


class Clipping:
    """No clipping; the base of the rules below.

    ``__call__(gradients, variables, unit_axes, norm, threshold)`` returns
    ``(gradients, clipped)``: the clipped list and a bool scalar, ``True`` if
    the rule changed the gradient; ``unit_axes`` holds each weight's fan-in
    axes (``None``: no per-unit fan-in), ``norm`` the pre-clip global norm and
    ``threshold`` what :meth:`threshold` returned for it.
    """

    option = None

    @property
    def value(self):
        return None

    def build(self, add_state):
        """Creates the rule's state with ``add_state(name, shape, dtype, initializer)``."""

    def threshold(self, norm):
        """The global-norm threshold of this step, or ``None`` (an adaptive one updates its state)."""
        return None

    def __call__(self, gradients, variables, unit_axes, norm, threshold):
        return gradients, tf.constant(False)

    def config(self):
        """``{option name: value}`` of every clipping option."""
        return {name: (self.value if name == self.option else None) for name in OPTIONS}


class GlobalNormClipping(Clipping):
    """``g_i <- g_i * min(1, c / n)``: the direction kept, the global norm at most ``c``.

    ``c`` is a number or an adaptive threshold (:mod:`keras_gradops.thresholds`),
    evaluated once per step. A NaN ``n`` makes every entry NaN, as
    ``tf.clip_by_global_norm`` does.
    """

    option = "global_clipnorm"

    def __init__(self, threshold):
        threshold = deserialize_threshold(threshold)
        if not isinstance(threshold, AdaptiveThreshold):
            threshold = check_positive(threshold, "global_clipnorm")
        self._threshold = threshold

    @property
    def value(self):
        return self._threshold

    def build(self, add_state):
        if isinstance(self._threshold, AdaptiveThreshold):
            self._threshold.build(add_state)

    def threshold(self, norm):
        if isinstance(self._threshold, AdaptiveThreshold):
            return self._threshold.update(norm)
        return tf.constant(self._threshold, tf.float32)

    def __call__(self, gradients, variables, unit_axes, norm, threshold):
        scale = tf.minimum(1.0, threshold / norm)  # 1 for a norm of 0; NaN for a NaN norm

        def rescale(values):
            return values * tf.cast(scale, values.dtype)

        return [None if g is None else map_values(g, rescale) for g in gradients], norm > threshold


class NormClipping(Clipping):
    """Each tensor independently: ``g <- g * c / max(||g||, c)``."""

    option = "clipnorm"

    def __init__(self, clipnorm):
        self._clipnorm = check_positive(clipnorm, "clipnorm")

    @property
    def value(self):
        return self._clipnorm

    def __call__(self, gradients, variables, unit_axes, norm, threshold):
        present = [values_of(g) for g in gradients if g is not None]
        clipped = _any([tf.norm(to_float32(g)) > self._clipnorm for g in present])
        return clip_by_norm(gradients, self._clipnorm), clipped


class ValueClipping(Clipping):
    """Each element to ``[-c, c]`` (changes the direction)."""

    option = "clipvalue"

    def __init__(self, clipvalue):
        self._clipvalue = check_positive(clipvalue, "clipvalue")

    @property
    def value(self):
        return self._clipvalue

    def __call__(self, gradients, variables, unit_axes, norm, threshold):
        present = [values_of(g) for g in gradients if g is not None]
        clipped = _any([tf.reduce_max(tf.abs(g)) > self._clipvalue for g in present])
        return clip_by_value(gradients, self._clipvalue), clipped


class AdaptiveClipping(Clipping):
    """AGC (Brock et al. 2021): each output unit's ``||G_i||`` at most ``lam * max(||W_i||, eps)``."""

    option = "adaptive_clipping"

    def __init__(self, clipping, eps):
        self._clipping = check_positive(clipping, "adaptive_clipping")
        self.eps = check_positive(eps, "adaptive_clipping_eps")

    @property
    def value(self):
        return self._clipping

    def __call__(self, gradients, variables, unit_axes, norm, threshold):
        # A weight of rank <= 1 or without a per-unit fan-in is one unit.
        new = [
            None if g is None else clip_unitwise(g, v, axes if axes and len(v.shape) > 1 else (),
                                                 self._clipping, self.eps)
            for g, v, axes in zip(gradients, variables, unit_axes)
        ]
        # AGC scales a unit by exactly 1.0 when it is within bounds.
        changed = [
            tf.reduce_any(tf.not_equal(values_of(n), values_of(g)))
            for n, g in zip(new, gradients)
            if g is not None
        ]
        return new, _any(changed)

    def config(self):
        return {**super().config(), "adaptive_clipping_eps": self.eps}


def clipping_from_options(global_clipnorm=None, clipnorm=None, clipvalue=None, adaptive_clipping=None,
                          adaptive_clipping_eps=1e-3):
    """The :class:`Clipping` rule chosen by at most one of the four options.

    Raises:
        ValueError: a threshold is not a positive finite number, or more than
            one option is set.
    """
    check_optional_positive(adaptive_clipping_eps, "adaptive_clipping_eps")
    chosen = {
        name: value
        for name, value in zip(OPTIONS, (global_clipnorm, clipnorm, clipvalue, adaptive_clipping))
        if value is not None
    }
    if len(chosen) > 1:
        raise ValueError(
            "Only one of `global_clipnorm`, `clipnorm`, `clipvalue` and `adaptive_clipping` can be set. "
            f"Received: {', '.join(f'{n}={v}' for n, v in chosen.items())}"
        )
    if global_clipnorm is not None:
        return GlobalNormClipping(global_clipnorm)
    if clipnorm is not None:
        return NormClipping(clipnorm)
    if clipvalue is not None:
        return ValueClipping(clipvalue)
    if adaptive_clipping is not None:
        return AdaptiveClipping(adaptive_clipping, adaptive_clipping_eps)
    return Clipping()


def _any(flags):
    return tf.reduce_any(tf.stack(flags)) if flags else tf.constant(False)
