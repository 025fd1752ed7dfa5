"""Clipping thresholds that adapt to the gradient's own history: AutoClip and ZClip.

Pass one wherever a number goes for ``global_clipnorm`` (the wrapper models,
every optimizer of this package, ``with_gradient_centralization``)::

    model = kgo.GradientOpsModel(net, global_clipnorm=kgo.AutoClip(quantile=0.1, history=1000))
    opt = kgo.SGDGC(0.1, momentum=0.9, global_clipnorm=kgo.ZClip(z_threshold=2.5, alpha=0.97))

At each step the chain hands the threshold the pre-clip global norm ``n_t`` of
the aggregated gradient (the same on every replica and worker) and clips at
the threshold it returns. The state (history, moving statistics, counts)
lives in non-trainable variables of the optimizer or model, so it is saved
in ``.keras`` files and a resumed run continues exactly. A non-finite norm
never enters the state, and a step the non-finite guard skips never reaches
it. A threshold object serves one optimizer or model.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_gradops.arguments import (
    check_bool,
    check_choice,
    check_in_interval,
    check_optional_positive,
    check_positive,
    check_positive_int,
    require,
)

NO_LIMIT = float(np.finfo(np.float32).max)
"""The threshold that clips nothing (a finite stand-in for infinity)."""

_register = keras.saving.register_keras_serializable(package="keras_gradops")


class AdaptiveThreshold:
    """The interface: ``build(add_state)`` once, then ``update(norm) -> threshold`` each step."""

    def __init__(self):
        self._built = False

    def build(self, add_state):
        """Creates the state with ``add_state(name, shape, dtype, initializer) -> variable``.

        Raises:
            ValueError: already built (the instance serves another optimizer or model).
        """
        if self._built:
            raise ValueError(
                f"This {type(self).__name__} already holds the state of another optimizer or model; "
                f"give each one its own, e.g. `{type(self).__name__}.from_config(threshold.get_config())`."
            )
        self._create_state(add_state)
        self._built = True

    def _create_state(self, add_state):
        raise NotImplementedError

    def update(self, norm):
        """The threshold for the step whose pre-clip global norm is ``norm`` (updates the state)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@_register
class AutoClip(AdaptiveThreshold):
    """AutoClip: clip at a quantile of the global norms seen so far.

    Seetharaman et al., "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks", MLSP 2020. At step ``t``, with ``n_t`` the pre-clip
    global norm of the aggregated gradient, the threshold is
    ``numpy.quantile(B_t, quantile)`` (linear interpolation, NumPy's default),
    where ``B_t`` holds the norms of the last ``history`` steps with a finite
    norm, ``n_t`` included; the gradient is then clipped by global norm at it.
    The paper uses the 10th percentile of every past norm; here the history
    is a ring buffer of ``history`` norms (bounded memory, XLA-compatible; the
    reference library ``autoclip`` keeps 1000).

    Args:
        quantile: in ``[0, 1]``. Defaults to 0.1 (the paper's 10th percentile).
        history: how many past finite norms to keep, ``>= 1``. Defaults to 1000.

    Example:
        >>> clip = AutoClip(quantile=0.5, history=3)
        >>> clip.build(lambda name, shape, dtype, initializer: tf.Variable(tf.zeros(shape, dtype)))
        >>> [round(float(clip.update(tf.constant(n))), 3) for n in (4.0, 2.0, 9.0, 1.0)]
        [4.0, 3.0, 4.0, 2.0]
    """

    def __init__(self, quantile=0.1, history=1000):
        super().__init__()
        self.quantile = check_in_interval(quantile, "quantile", 0, 1)
        self.history = check_positive_int(history, "history")

    def _create_state(self, add_state):
        self.norms = add_state("autoclip_norms", (self.history,), "float32", "zeros")
        self.count = add_state("autoclip_count", (), "int64", "zeros")

    def update(self, norm):
        norm = tf.cast(norm, tf.float32)
        finite = tf.math.is_finite(norm)
        slot = tf.math.floormod(self.count, self.history)
        written = tf.tensor_scatter_nd_update(tf.convert_to_tensor(self.norms), [[slot]], [norm])
        norms = tf.where(finite, written, self.norms)
        count = self.count + tf.cast(finite, tf.int64)
        self.norms.assign(norms)
        self.count.assign(count)
        kept = tf.minimum(count, self.history)
        valid = tf.range(self.history, dtype=tf.int64) < kept
        ordered = tf.sort(tf.where(valid, norms, NO_LIMIT))
        # NumPy's "linear" method: the value at virtual index quantile * (kept - 1).
        position = self.quantile * tf.cast(tf.maximum(kept - 1, 0), tf.float32)
        below = tf.floor(position)
        low = tf.gather(ordered, tf.cast(below, tf.int64))
        high = tf.gather(ordered, tf.minimum(tf.cast(below, tf.int64) + 1, tf.maximum(kept - 1, 0)))
        threshold = low + (position - below) * (high - low)
        return tf.where(kept > 0, threshold, NO_LIMIT)

    def get_config(self):
        return {"quantile": self.quantile, "history": self.history}


ZSCORE, PERCENTILE = "zscore", "percentile"
ADAPTIVE_SCALING, MEAN = "adaptive_scaling", "mean"


@_register
class ZClip(AdaptiveThreshold):
    """ZClip: a z-score of the norm against its exponential moving mean and variance.

    Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
    arXiv 2504.02507; this follows the reference code, ``zclip/zclip.py`` of
    bluorion-com/ZClip, with its defaults. Per step, ``n`` the pre-clip
    global norm of the aggregated gradient:

    - warm-up: the first ``warmup_steps`` norms are collected; the threshold
      is ``max_norm``. Then ``mu`` and ``v`` are their mean and (population)
      variance.
    - ``mode="zscore"`` (default): ``z = (n - mu) / (sqrt(v) + eps)``; if
      ``z > z_threshold`` the norm is a spike and is pulled back to
      ``c = mu + z_threshold * sqrt(v) / (z / z_threshold) * clip_factor``
      (``clip_option="adaptive_scaling"``, default) or ``c = mu``
      (``clip_option="mean"``). ``mode="percentile"``: ``c = mu + z_threshold
      * sqrt(v)`` at every step, a spike when ``n > c``.
    - the threshold is ``min(c, max_norm)`` for a spike (and always in
      percentile mode), else ``max_norm``: like the reference, the gradient
      is also capped at ``max_norm`` (1.0 by default; ``None`` for no cap).
    - the statistics follow ``x = c`` on a spike, else ``x = n``:
      ``mu <- alpha mu + (1 - alpha) x``, then ``v <- alpha v + (1 - alpha)
      (x - mu)^2`` with the new ``mu`` (not on a spike with
      ``skip_update_on_spike``).

    The clip itself is this package's global-norm clipping, ``g * t / max(n, t)``
    (the reference divides by ``n + 1e-6``).

    Args:
        z_threshold: the z-score above which a norm is a spike. Defaults to 2.5.
        alpha: smoothing of the moving statistics, in ``[0, 1)``. Defaults to 0.97.
        warmup_steps: norms collected before the statistics start. Defaults to 25.
        max_norm: the fixed cap (the reference's ``max_grad_norm``), or ``None``.
            Defaults to 1.0.
        eps: added to the standard deviation in the z-score. Defaults to 1e-6.
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (z-score mode).
        clip_factor: multiplies the adaptive-scaling threshold. Defaults to 1.0.
        skip_update_on_spike: keep a spike out of the statistics.

    Example:
        >>> clip = ZClip(warmup_steps=2, max_norm=None)
        >>> clip.build(lambda name, shape, dtype, initializer: tf.Variable(tf.zeros(shape, dtype)))
        >>> thresholds = [float(clip.update(tf.constant(n))) for n in (1.0, 3.0, 2.0, 50.0)]
        >>> thresholds[2] > 1e38, round(thresholds[3], 3)  # no spike, then a spike pulled back
        (True, 2.126)
    """

    def __init__(self, z_threshold=2.5, alpha=0.97, warmup_steps=25, max_norm=1.0, eps=1e-6, mode=ZSCORE,
                 clip_option=ADAPTIVE_SCALING, clip_factor=1.0, skip_update_on_spike=False):
        super().__init__()
        self.z_threshold = check_positive(z_threshold, "z_threshold")
        self.alpha = check_in_interval(alpha, "alpha", 0, 1, closed_high=False)
        self.warmup_steps = check_positive_int(warmup_steps, "warmup_steps")
        self.max_norm = check_optional_positive(max_norm, "max_norm")
        self.eps = check_positive(eps, "eps")
        self.mode = check_choice(mode, "mode", (ZSCORE, PERCENTILE))
        self.clip_option = check_choice(clip_option, "clip_option", (ADAPTIVE_SCALING, MEAN))
        self.clip_factor = check_positive(clip_factor, "clip_factor")
        self.skip_update_on_spike = check_bool(skip_update_on_spike, "skip_update_on_spike")
        require(not (mode == PERCENTILE and clip_option == MEAN), "clip_option", clip_option,
                "'adaptive_scaling' (it is ignored) in percentile mode")

    def _create_state(self, add_state):
        self.warmup_norms = add_state("zclip_warmup_norms", (self.warmup_steps,), "float32", "zeros")
        self.count = add_state("zclip_count", (), "int64", "zeros")
        self.mean = add_state("zclip_mean", (), "float32", "zeros")
        self.variance = add_state("zclip_variance", (), "float32", "zeros")

    def update(self, norm):
        norm = tf.cast(norm, tf.float32)
        finite = tf.math.is_finite(norm)
        cap = NO_LIMIT if self.max_norm is None else float(self.max_norm)
        warming = self.count < self.warmup_steps
        # Warm-up: collect the norm; the statistics start from the collected norms.
        slot = tf.minimum(self.count, self.warmup_steps - 1)
        written = tf.tensor_scatter_nd_update(tf.convert_to_tensor(self.warmup_norms), [[slot]], [norm])
        warmup_norms = tf.where(finite & warming, written, self.warmup_norms)
        count = self.count + tf.cast(finite, tf.int64)
        starts = finite & warming & tf.equal(count, self.warmup_steps)
        initial_mean = tf.reduce_mean(warmup_norms)
        initial_variance = tf.reduce_mean(tf.square(warmup_norms - initial_mean))
        # After warm-up: a spike's clip value.
        mean, variance = tf.convert_to_tensor(self.mean), tf.convert_to_tensor(self.variance)
        std = tf.sqrt(variance)
        if self.mode == PERCENTILE:
            clip_value = mean + self.z_threshold * std
            spike = norm > clip_value
        else:
            z = (norm - mean) / (std + self.eps)
            spike = z > self.z_threshold
            if self.clip_option == ADAPTIVE_SCALING:
                clip_value = (mean + self.z_threshold * std / (z / self.z_threshold)) * self.clip_factor
            else:
                clip_value = mean
        statistics_on = finite & tf.logical_not(warming)
        spike = statistics_on & spike
        in_force = clip_value if self.mode == PERCENTILE else tf.where(spike, clip_value, NO_LIMIT)
        threshold = tf.where(statistics_on, tf.minimum(in_force, cap), cap)
        followed = tf.where(spike, clip_value, norm)
        moves = statistics_on & tf.logical_not(spike & self.skip_update_on_spike)
        new_mean = self.alpha * mean + (1 - self.alpha) * followed
        new_variance = self.alpha * variance + (1 - self.alpha) * tf.square(followed - new_mean)
        self.mean.assign(tf.where(starts, initial_mean, tf.where(moves, new_mean, mean)))
        self.variance.assign(tf.where(starts, initial_variance, tf.where(moves, new_variance, variance)))
        self.warmup_norms.assign(warmup_norms)
        self.count.assign(count)
        return threshold

    def get_config(self):
        return {
            "z_threshold": self.z_threshold, "alpha": self.alpha, "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm, "eps": self.eps, "mode": self.mode, "clip_option": self.clip_option,
            "clip_factor": self.clip_factor, "skip_update_on_spike": self.skip_update_on_spike,
        }


def deserialize_threshold(value):
    """``value`` itself, or the threshold a serialized config (a dict from a ``.keras`` file) describes."""
    if isinstance(value, dict):
        return keras.saving.deserialize_keras_object(value)
    return value
