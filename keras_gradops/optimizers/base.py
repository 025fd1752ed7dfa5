"""The gradient chain inside a Keras optimizer: what every optimizer of this package shares.

Keras' ``Optimizer.apply`` clips each replica's gradient BEFORE the
cross-replica all-reduce, so under ``tf.distribute`` its "global" norm is a
per-replica one. :class:`GradientChainMixin` runs the chain of
:mod:`keras_gradops.pipeline.chain` on the gradient Keras has just summed
over replicas (the step's one all-reduce). Per step:

1. with ``skip_nonfinite=True``, a step whose aggregated gradient would hold
   a NaN/Inf is skipped before anything changes (:mod:`keras_gradops.pipeline.guard`):
   no weight, no slot, not ``iterations``; counted in ``skipped_steps``;
2. Keras' decoupled weight decay ``w <- w - lr * wd * w`` (classes whose
   ``weight_decay`` is decoupled);
3. clipping of the aggregated gradient (``global_clipnorm``, ``clipnorm``,
   ``clipvalue`` or ``adaptive_clipping``); the pre-clip global norm is kept
   in ``grad_norm``, the global-norm threshold in ``grad_clip_threshold`` (not
   ``clip_threshold``, an Adafactor hyperparameter);
4. per weight, in ``update_step`` (Keras' public per-variable hook): L2
   ``g <- g + wd * w`` (classes whose ``weight_decay`` is L2), gradient
   centralization, then the base optimizer's own ``update_step``.
"""

import inspect
import math

import keras
from keras.optimizers.schedules import LearningRateSchedule

from keras_gradops import keras_internals
from keras_gradops.arguments import (
    check_bool,
    check_in_interval,
    check_non_negative,
    is_number,
    require,
)
from keras_gradops.pipeline import guard
from keras_gradops.pipeline.chain import GradientChain
from keras_gradops.pipeline.clipping import GlobalNormClipping, clipping_from_options


def normalize_learning_rate(value):
    """Checks ``learning_rate`` (finite and > 0, or a schedule/callable); ints become floats."""
    if isinstance(value, LearningRateSchedule) or callable(value):
        return value
    require(is_number(value) and math.isfinite(value) and value > 0, "learning_rate", value,
            "a positive finite float, a `LearningRateSchedule` or a callable")
    return float(value)


def check_hyperparameters(arguments):
    """Raises ``ValueError`` naming the first out-of-range Keras hyperparameter."""
    for name, value in arguments.items():
        if value is None:
            continue
        if name in ("momentum", "ema_momentum"):
            check_in_interval(value, name, 0, 1)
        elif name in ("beta_1", "beta_2"):
            check_in_interval(value, name, 0, 1, closed_high=False)
        elif name in ("weight_decay", "epsilon", "initial_accumulator_value"):
            check_non_negative(value, name)


class GradientChainMixin(keras_internals.AggregatedGradientOptimizerMixin):
    """Runs the guard, clipping, L2 and centralization around a Keras optimizer's update.

    Mixed in before a Keras optimizer class: ``class SGDGC(GradientChainMixin,
    keras.optimizers.SGD)``. Class attributes choose the variant:

    - ``weight_decay_is_l2``: ``weight_decay`` is added to the gradient before
      centralization instead of being Keras' decoupled decay.
    - ``conv_only``: centralize only convolution kernels (rank >= 4).

    Extra constructor arguments:
        fan_in_axes: optional ``{variable.path: axes or None}`` for weights whose
            output unit is not the last axis (``keras_gradops.fan_in_axes(model)``).
            Without it, each weight's layer is looked up when the optimizer is
            built (:func:`keras_gradops.fan_in.unit_axes`).
        adaptive_clipping, adaptive_clipping_eps: adaptive gradient clipping
            (AGC, Brock et al. 2021), instead of the other clipping options.
        skip_nonfinite: skip steps whose aggregated gradient holds a NaN/Inf
            (not with ``use_ema``: Keras updates the average outside the step).
    """

    weight_decay_is_l2 = False
    conv_only = False

    def __init__(self, *args, fan_in_axes=None, skip_nonfinite=False, adaptive_clipping=None,
                 adaptive_clipping_eps=1e-3, **kwargs):
        base = self._keras_base_class()
        bound = inspect.signature(base.__init__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        arguments.update(arguments.pop("kwargs", {}))
        arguments["learning_rate"] = normalize_learning_rate(arguments["learning_rate"])
        check_hyperparameters(arguments)
        check_bool(skip_nonfinite, "skip_nonfinite")
        if skip_nonfinite and arguments.get("use_ema"):
            raise ValueError(
                "`skip_nonfinite=True` with `use_ema=True`: Keras updates the moving average after every "
                "`apply`, so a skipped step would still move it. Use `keras_gradops.GradientOpsModel("
                "model, skip_nonfinite=True)`, which skips the whole update, EMA included."
            )
        clipping = clipping_from_options(
            global_clipnorm=arguments.get("global_clipnorm"), clipnorm=arguments.get("clipnorm"),
            clipvalue=arguments.get("clipvalue"), adaptive_clipping=adaptive_clipping,
            adaptive_clipping_eps=adaptive_clipping_eps,
        )
        l2 = arguments.get("weight_decay") if self.weight_decay_is_l2 else None
        if self.weight_decay_is_l2:
            arguments["weight_decay"] = None
        super().__init__(**arguments)
        self.l2_weight_decay = l2
        self.skip_nonfinite = skip_nonfinite
        # Subclasses that centralize the update, or take ``conv_only`` as an argument, adjust the chain.
        self.chain = GradientChain(clipping, centralize=True, conv_only=self.conv_only, fan_in_axes=fan_in_axes, l2=l2)

    @classmethod
    def _keras_base_class(cls):
        """The optimizer class the mixins are put on (its ``__init__`` signature is the API)."""
        return next(
            c for c in cls.__mro__
            if issubclass(c, keras.optimizers.Optimizer) and not issubclass(c, GradientChainMixin)
        )

    @property
    def fan_in_axes(self):
        return self.chain.fan_in_axes

    def exclude_from_centralization(self, var_list=None, var_names=None):
        """Never centralize these variables (by variable, or by ``re.search`` on the name); before training.

        See :meth:`keras_gradops.pipeline.chain.GradientChain.exclude_from_centralization`.
        """
        self.chain.exclude_from_centralization(var_list, var_names)

    def build(self, var_list):
        if self.built:
            return
        keras_internals.check_aggregation_hook()
        super().build(var_list)
        self.grad_norm = self.add_variable(
            shape=(), dtype="float32", initializer="zeros", aggregation="only_first_replica", name="grad_norm",
        )
        self.skipped_steps = self.add_variable(
            shape=(), dtype="int64", initializer="zeros", aggregation="only_first_replica", name="skipped_steps",
        )
        self.grad_clip_threshold = None
        if isinstance(self.chain.clipping, GlobalNormClipping):
            self.grad_clip_threshold = self.add_variable(
                shape=(), dtype="float32", initializer="zeros", aggregation="only_first_replica",
                name="grad_clip_threshold",
            )
        self.chain.build(
            var_list, add_state=self._add_state,
            decays=lambda v: keras_internals.uses_weight_decay(self, v),
        )

    def _add_state(self, name, shape, dtype, initializer):
        return self.add_variable(shape=shape, dtype=dtype, initializer=initializer,
                                 aggregation="only_first_replica", name=name)

    def apply(self, grads, trainable_variables=None):
        """Keras' ``apply``; with ``skip_nonfinite``, only if every replica's gradient is safe."""
        if not self.skip_nonfinite:
            return super().apply(grads, trainable_variables)
        if not self.built and trainable_variables is not None:
            self.build(list(trainable_variables))
        base_apply = super().apply
        guard.apply_if_finite(lambda g: base_apply(g, trainable_variables), list(grads),
                              lambda: self.skipped_steps.assign_add(1))

    def transform_aggregated_gradients(self, gradients, variables):
        """Step 3, called by Keras right after it summed the replicas' gradients."""
        indices = [keras_internals.variable_index(self, v) for v in variables]
        gradients, statistics = self.chain.clip(gradients, variables, indices)
        self.grad_norm.assign(statistics.norm)
        if statistics.threshold is not None:
            self.grad_clip_threshold.assign(statistics.threshold)
        return gradients

    def update_step(self, gradient, variable, learning_rate):
        """Step 4 for one weight: L2 and centralization, then the base update."""
        index = keras_internals.variable_index(self, variable)
        super().update_step(self.chain.finish(gradient, variable, index), variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        if self.weight_decay_is_l2:
            config["weight_decay"] = self.l2_weight_decay
        config["fan_in_axes"] = self.chain.fan_in_axes
        config["skip_nonfinite"] = self.skip_nonfinite
        config["adaptive_clipping"] = self.chain.clipping.config()["adaptive_clipping"]
        config["adaptive_clipping_eps"] = getattr(self.chain.clipping, "eps", 1e-3)
        return config
