"""The gradient pipeline shared by every optimizer of this package.

Keras' ``Optimizer.apply`` clips each replica's gradient BEFORE the
cross-replica all-reduce, so under ``tf.distribute.MirroredStrategy`` a
"global" norm is a per-replica one. :class:`GradientPipelineMixin` moves the
whole pipeline after the all-reduce. Per step, on the aggregated gradient:

1. clipping (``global_clipnorm`` / ``clipnorm`` / ``clipvalue``) of the raw
   gradient, recording the pre-clip global norm in ``gradient_norm``;
2. L2 weight decay ``g <- g + weight_decay * w`` (classes whose
   ``weight_decay`` is L2, as in the reference ``SGD_GC``/``Adam_GC``);
3. gradient centralization per output unit (Yong et al., ECCV 2020);
4. the base optimizer's ``update_step``, preceded by Keras' decoupled weight
   decay ``w <- w - lr * weight_decay * w`` in the classes where it is
   decoupled; with ``skip_nonfinite=True`` a step whose aggregated gradient
   holds a NaN/Inf changes no weight and no slot and is counted in
   ``skipped_steps``.
"""

import inspect

import tensorflow as tf

from keras_gradops.ops import clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from keras_gradops.ops.centralization import centralization_axes, centralize
from keras_gradops.optimizers.validation import (
    normalize_learning_rate,
    validate_fan_in_axes,
    validate_hyperparameters,
)


class GradientPipelineMixin:
    """Runs clipping, L2, centralization and the update on the aggregated gradient.

    Mixed in before a Keras optimizer class: ``class SGDGC(GradientPipelineMixin,
    keras.optimizers.SGD)``. Class attributes choose the variant:

    - ``weight_decay_is_l2``: ``weight_decay`` is added to the gradient before
      centralization instead of being Keras' decoupled decay.
    - ``conv_only``: centralize only convolution kernels (rank >= 4).
    - ``centralize_gradient``: centralize the gradient (``False`` when a
      subclass centralizes the final update instead).

    Extra constructor arguments:
        fan_in_axes: optional ``{variable.path: axes or None}`` for weights whose
            output unit is not the last axis (build it with
            ``keras_gradops.fan_in_axes(model)``); ``None`` excludes a weight.
        skip_nonfinite: if ``True``, a step whose aggregated gradient has a
            NaN/Inf leaves weights and slots untouched (``iterations`` still
            advances) and increments ``skipped_steps``.
    """

    weight_decay_is_l2 = False
    conv_only = False
    centralize_gradient = True

    def __init__(self, *args, fan_in_axes=None, skip_nonfinite=False, **kwargs):
        base = self._keras_base_class()
        bound = inspect.signature(base.__init__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        arguments.update(arguments.pop("kwargs", {}))
        arguments["learning_rate"] = normalize_learning_rate(arguments["learning_rate"])
        validate_hyperparameters(arguments)
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"`skip_nonfinite` must be a bool. Received: skip_nonfinite={skip_nonfinite!r}")
        l2 = arguments.get("weight_decay") if self.weight_decay_is_l2 else None
        if self.weight_decay_is_l2:
            arguments["weight_decay"] = None
        super().__init__(**arguments)
        self.l2_weight_decay = l2
        self.fan_in_axes = validate_fan_in_axes(fan_in_axes)
        self.skip_nonfinite = skip_nonfinite
        self._exclude_from_centralization = ()

    @classmethod
    def _keras_base_class(cls):
        mro = cls.__mro__
        return mro[mro.index(GradientPipelineMixin) + 1]

    def exclude_from_centralization(self, var_list=None, var_names=None):
        """Never centralize these variables (call before the optimizer is built).

        Args:
            var_list: variables to exclude.
            var_names: strings; a variable whose name contains one is excluded,
                as in Keras' ``exclude_from_weight_decay``.
        """
        if self.built:
            raise ValueError("`exclude_from_centralization()` must be called before the optimizer is built.")
        self._exclude_from_centralization = (
            tuple(v.path for v in var_list or ()),
            tuple(var_names or ()),
        )

    def _is_excluded(self, variable):
        if not self._exclude_from_centralization:
            return False
        paths, names = self._exclude_from_centralization
        return variable.path in paths or any(n in variable.name for n in names)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.gradient_norm = self.add_variable(
            shape=(), dtype="float32", initializer="zeros",
            aggregation="only_first_replica", name="gradient_norm",
        )
        self.skipped_steps = self.add_variable(
            shape=(), dtype="int64", initializer="zeros",
            aggregation="only_first_replica", name="skipped_steps",
        )
        self._unit_axes = tuple(
            None if self._is_excluded(v) else centralization_axes(v, self.conv_only, self.fan_in_axes)
            for v in var_list
        )

    def _axes_of(self, variable):
        return self._unit_axes[self._get_variable_index(variable)]

    def _clip_gradients(self, grads):
        # Clipping is deferred to `_backend_update_step`, after the all-reduce.
        return grads

    def _apply_weight_decay(self, variables):
        # Decoupled decay is applied per variable inside the (guarded) update.
        return

    def _transform_gradients(self, grads, variables):
        """Clip, add L2, centralize: steps 1-3 on the aggregated gradient."""
        if self.global_clipnorm:
            grads, norm = clip_by_global_norm(grads, self.global_clipnorm)
        else:
            norm = global_norm(grads)
            if self.clipnorm:
                grads = clip_by_norm(grads, self.clipnorm)
            elif self.clipvalue:
                grads = clip_by_value(grads, self.clipvalue)
        if self.l2_weight_decay:
            grads = [self._add_l2(g, v) for g, v in zip(grads, variables)]
        if self.centralize_gradient:
            grads = [centralize(g, self._axes_of(v)) for g, v in zip(grads, variables)]
        return grads, norm

    def _add_l2(self, grad, variable):
        """``g + weight_decay * w`` (a sparse gradient becomes dense: so is the L2 term)."""
        if grad is None or not self._use_weight_decay(variable):
            return grad
        return tf.convert_to_tensor(grad) + tf.cast(self.l2_weight_decay, variable.dtype) * variable

    def _all_reduce_sum_gradients(self, grads_and_vars):
        """Keras' cross-replica sum, then steps 1-3 on the aggregated gradient.

        Keras' ``_backend_update_step`` calls this right before the per-variable
        updates (so a base class's own ``_backend_update_step``, e.g. Nadam's,
        still runs). The pre-clip norm rides along as a last ``(norm, None)``
        pair, so that under ``tf.distribute`` it reaches
        :meth:`_distributed_tf_update_step` as a per-replica value.
        """
        grads_and_vars = super()._all_reduce_sum_gradients(grads_and_vars)
        variables = [v for _, v in grads_and_vars]
        grads, norm = self._transform_gradients([g for g, _ in grads_and_vars], variables)
        self.gradient_norm.assign(norm)
        if self.skip_nonfinite:
            self.skipped_steps.assign_add(tf.cast(tf.logical_not(tf.math.is_finite(norm)), "int64"))
        return list(zip(grads, variables)) + [(norm, None)]

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        """Step 4 per variable, skipped when ``skip_nonfinite`` and the norm is not finite."""
        *grads_and_vars, (norm, _) = grads_and_vars

        def update(var, grad, lr, norm):
            if not self.skip_nonfinite:
                self._update_variable(grad, var, lr)
                return
            tf.cond(tf.math.is_finite(norm), lambda: self._update_variable(grad, var, lr), lambda: None)

        for grad, var in grads_and_vars:
            distribution.extended.update(var, update, args=(grad, learning_rate, norm), group=False)

    def _uses_decoupled_decay(self, variable):
        return (
            not self.weight_decay_is_l2
            and self.weight_decay is not None
            and self._use_weight_decay(variable)
        )

    def _update_variable(self, grad, var, learning_rate):
        """Step 4 for one variable: decoupled decay (if any), then the base update."""
        if self._uses_decoupled_decay(var):
            lr = tf.cast(learning_rate, var.dtype)
            var.assign_sub(var * tf.cast(self.weight_decay, var.dtype) * lr)
        self.update_step(grad, var, learning_rate)

    def get_config(self):
        config = super().get_config()
        if self.weight_decay_is_l2:
            config["weight_decay"] = self.l2_weight_decay
        config["fan_in_axes"] = self.fan_in_axes
        config["skip_nonfinite"] = self.skip_nonfinite
        return config
