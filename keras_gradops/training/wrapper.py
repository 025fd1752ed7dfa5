"""A Keras model wrapper whose train step applies gradient ops and reports on them.

:class:`GradientWrapperModel` holds any Keras model and trains it with one
train step for every gradient source: a subclass changes only
:meth:`~GradientWrapperModel.compute_gradients` (backprop here, a forward-mode
guess in :mod:`keras_gradops.training.guessed`). Per step, on the gradient
summed over replicas:

1. the gradient ops of :class:`~keras_gradops.training.options.GradientOps`
   (clipping, then centralization), which record the pre-clip global norm;
2. ``optimizer.apply`` of any Keras optimizer; with ``skip_nonfinite`` a step
   whose global norm is NaN/Inf changes no weight and no optimizer variable;
3. telemetry as Keras metrics, so the fit logs, ``History``, the progress bar
   and ``keras.callbacks.TensorBoard`` show epoch means: ``grad_norm`` (pre-clip
   global norm), ``clipped_fraction`` (share of steps the clipping changed),
   ``skipped_steps`` (count of skipped steps), and ``grad_norm/<layer>``.
"""

import warnings

import keras
import tensorflow as tf
from keras.src.export import export_utils

from keras_gradops.fan_in import fan_in_axes as read_fan_in_axes
from keras_gradops.training import loss_scaling, replicas
from keras_gradops.training.gradient_probe import GradientProbe
from keras_gradops.training.layer_groups import group_norms, resolve_layers, variable_groups
from keras_gradops.training.options import GradientOps

_OPTIMIZER_CLIPPING = ("clipnorm", "clipvalue", "global_clipnorm")


class _SkipCounter:
    """Consecutive skipped steps, in a variable outside the model's weights."""

    def __init__(self):
        self.consecutive = tf.Variable(
            0, dtype=tf.int64, trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, name="consecutive_skips",
        )


def _check_max_consecutive_skips(value, skip_nonfinite):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`max_consecutive_skips` must be a positive int or None. Received: max_consecutive_skips={value!r}"
        )
    if not skip_nonfinite:
        raise ValueError(
            "`max_consecutive_skips` counts skipped steps; it needs `skip_nonfinite=True`. "
            f"Received: skip_nonfinite=False, max_consecutive_skips={value}"
        )


def _layer_norm_names(model, layer_norms):
    if layer_norms is None or layer_norms is False:
        return ()
    if layer_norms is True and not model.built:
        raise ValueError(
            "`layer_norms=True` reads the layers with trainable weights of a built model; "
            f"build {model.name!r} first or pass a list of layer names."
        )
    if layer_norms is True:
        return tuple(layer.name for layer in resolve_layers(model, True))
    if isinstance(layer_norms, (str, keras.layers.Layer)) or not isinstance(layer_norms, (list, tuple)):
        raise TypeError(
            "`layer_norms` must be None, True or a list of layer names or layers. "
            f"Received: layer_norms={layer_norms!r}"
        )
    names = {layer.name for layer in model._flatten_layers(include_self=False)}
    chosen = [entry.name if isinstance(entry, keras.layers.Layer) else entry for entry in layer_norms]
    for name in chosen:
        if name not in names:
            raise ValueError(f"`layer_norms`: no layer {name!r} in model {model.name!r}. Layers: {sorted(names)}")
    return tuple(chosen)


@keras.saving.register_keras_serializable(package="keras_gradops")
class GradientWrapperModel(keras.Model):
    """Wraps a Keras model; its train step applies gradient ops and logs telemetry.

    ``predict``, ``evaluate``, ``call`` and ``export`` behave as the wrapped
    model's. Subclasses provide another gradient source by overriding
    :meth:`compute_gradients`.

    Args:
        model: the ``keras.Model`` to train (available as ``self.model``).
        global_clipnorm, clipnorm, clipvalue, adaptive_clipping,
        adaptive_clipping_eps, centralize, conv_only, fan_in_axes: the gradient
            ops, see :class:`~keras_gradops.training.options.GradientOps`.
            ``fan_in_axes=None`` uses :func:`keras_gradops.fan_in_axes` of
            ``model``. Set clipping here, not on the optimizer.
        skip_nonfinite: if ``True``, a step whose aggregated gradient has a
            NaN/Inf (its global norm is not finite, which also catches a sum of
            squares beyond float32's range) changes no weight and no optimizer
            variable, ``iterations`` included, and is counted in
            ``skipped_steps``; ``grad_norm`` and ``clipped_fraction`` then
            average the applied steps only. (The optimizers of
            :mod:`keras_gradops.optimizers` offer the same guard without a
            wrapper, ``skip_nonfinite=True``; theirs advances ``iterations``.)
        max_consecutive_skips: with ``skip_nonfinite``, stop ``fit`` (with a
            warning) after this many skipped steps in a row.
        layer_norms: ``True`` (every top-level layer with trainable weights) or
            a list of layer names: log ``grad_norm/<layer>``, the pre-clip
            gradient norm of each layer's weights.
        **kwargs: ``keras.Model`` arguments (``name``, ...). The dtype policy
            defaults to the wrapped model's, so ``compile`` adds loss scaling
            when that is ``mixed_float16``.

    Raises:
        TypeError: ``model`` is not a Keras model.
        ValueError: an invalid or conflicting option.
    """

    def __init__(
        self,
        model,
        global_clipnorm=None,
        clipnorm=None,
        clipvalue=None,
        adaptive_clipping=None,
        adaptive_clipping_eps=1e-3,
        centralize=False,
        conv_only=False,
        fan_in_axes=None,
        skip_nonfinite=False,
        max_consecutive_skips=None,
        layer_norms=None,
        **kwargs,
    ):
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model. Received: model={model!r} of type {type(model).__name__}")
        gradient_ops = GradientOps(
            global_clipnorm=global_clipnorm, clipnorm=clipnorm, clipvalue=clipvalue,
            adaptive_clipping=adaptive_clipping, adaptive_clipping_eps=adaptive_clipping_eps,
            centralize=centralize, conv_only=conv_only, fan_in_axes=fan_in_axes,
        )
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"`skip_nonfinite` must be a bool. Received: skip_nonfinite={skip_nonfinite!r}")
        _check_max_consecutive_skips(max_consecutive_skips, skip_nonfinite)
        layer_names = _layer_norm_names(model, layer_norms)
        kwargs.setdefault("dtype", model.dtype_policy)
        super().__init__(**kwargs)
        self.model = model
        self.gradient_ops = gradient_ops
        self.skip_nonfinite = skip_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.layer_norms = layer_names
        self._grad_norm_tracker = keras.metrics.Mean(name="grad_norm")
        self._clipped_fraction_tracker = (
            keras.metrics.Mean(name="clipped_fraction") if gradient_ops.clips else None
        )
        self._skipped_steps_tracker = keras.metrics.Sum(name="skipped_steps") if skip_nonfinite else None
        self._layer_norm_trackers = [keras.metrics.Mean(name=f"grad_norm/{n}") for n in layer_names]
        self._skip_counter = _SkipCounter()
        self._gradient_probe = None
        if model.built:
            self.built = True

    # -- inference: the wrapped model ------------------------------------------------

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def build(self, input_shape=None):
        # No weights of its own; the wrapped model builds itself on its first call.
        self.built = True

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """As ``keras.Model.export``: the inference function only (``serve``).

        ``input_signature`` defaults to the wrapped model's, so a wrapper that
        was never called (e.g. just loaded from ``.keras``) can be exported.
        """
        if input_signature is None:
            input_signature = export_utils.get_input_signature(self.model)
        return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)

    # -- the gradient source ------------------------------------------------------

    def compute_gradients(self, x, y, sample_weight):
        """Backprop: the loss, the predictions and the gradient of this replica's loss.

        The loss is multiplied by ``self.optimizer.scale_loss`` inside the tape
        (loss scaling under ``mixed_float16``) and the gradients divided back,
        so what is returned is the gradient of ``loss`` itself.

        Subclasses override this to provide another gradient source.

        Args:
            x, y, sample_weight: one replica's batch.

        Returns:
            ``(loss, y_pred, gradients)``: ``loss`` as ``self.compute_loss``
            returns it (divided by the number of replicas, as in Keras),
            ``y_pred`` for the compiled metrics, and the list of gradients of
            ``loss`` aligned with ``self.trainable_variables`` (``None`` for no
            gradient), NOT loss-scaled and not yet summed over replicas.
        """
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)  # builds an unbuilt wrapped model
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._build_optimizer()
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        return loss, y_pred, loss_scaling.unscale(gradients, loss_scaling.loss_scale(self.optimizer))

    # -- the train step ------------------------------------------------------------

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._build_optimizer()  # before a gradient source reads the loss scale
        loss, y_pred, gradients = self.compute_gradients(x, y, sample_weight)
        self._build_optimizer()  # once a first call has built the wrapped model
        self._track_loss(loss, x)
        variables = self.trainable_variables
        gradients = replicas.sum_over_replicas(gradients)
        applied, norm, clipped = self.gradient_ops.apply(gradients, variables, read_fan_in_axes(self.model))
        finite = tf.math.is_finite(norm)
        self._apply_gradients(applied, variables, finite)
        self._update_telemetry(gradients, applied, norm, clipped, finite)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def _build_optimizer(self):
        """Builds the optimizer once the model is, before its first traced use.

        Without a distribution strategy Keras builds the optimizer inside its
        first ``apply``; a loss-scale optimizer must exist earlier, or the
        traced step would scale the loss by a constant instead of its
        dynamic scale.
        """
        if not self.optimizer.built and self.model.built:
            self.optimizer.build(self.trainable_variables)

    def _track_loss(self, loss, x):
        if self._loss_tracker is None:
            return
        batch_size = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
        replicas_in_sync = tf.distribute.get_strategy().num_replicas_in_sync
        self._loss_tracker.update_state(loss * tf.cast(replicas_in_sync, loss.dtype), sample_weight=batch_size)

    def _apply_gradients(self, gradients, variables, finite):
        """``optimizer.apply`` of the aggregated gradient, guarded when asked or loss-scaled."""
        optimizer = loss_scaling.updating_optimizer(self.optimizer)

        def apply(gradients):
            with loss_scaling.applying_unscaled(optimizer):
                optimizer.apply(gradients, variables)
            loss_scaling.after_finite_step(self.optimizer)

        def skip():
            loss_scaling.after_nonfinite_step(self.optimizer)

        gradients = replicas.first_replica_only(gradients)
        if self.skip_nonfinite or optimizer is not self.optimizer:
            replicas.run_if(finite, apply, skip, args=(gradients,))
        else:
            apply(gradients)
        if self.skip_nonfinite:
            consecutive = self._skip_counter.consecutive
            consecutive.assign(tf.where(finite, tf.constant(0, tf.int64), consecutive + 1))

    def _update_telemetry(self, gradients, applied, norm, clipped, finite):
        weight = tf.cast(finite, "float32") if self.skip_nonfinite else None

        def mean_over_steps(tracker, value):
            value = tf.cast(value, "float32")
            if weight is not None:
                value = tf.where(finite, value, 0.0)  # NaN * 0 would poison the mean
            tracker.update_state(value, sample_weight=weight)

        mean_over_steps(self._grad_norm_tracker, norm)
        if self._clipped_fraction_tracker is not None:
            mean_over_steps(self._clipped_fraction_tracker, clipped)
        if self._skipped_steps_tracker is not None:
            counted_once = tf.logical_and(tf.logical_not(finite), replicas.is_first_replica())
            self._skipped_steps_tracker.update_state(tf.cast(counted_once, "float32"))
        if self._layer_norm_trackers:
            groups = variable_groups(resolve_layers(self.model, list(self.layer_norms)), self.trainable_variables)
            for tracker, layer_norm in zip(self._layer_norm_trackers, group_norms(gradients, groups)):
                mean_over_steps(tracker, layer_norm)
        probe = self._gradient_probe
        if probe is not None:
            groups = variable_groups(resolve_layers(self.model, list(probe.layer_names)), self.trainable_variables)
            probe.record(applied if probe.stage == "applied" else gradients, groups)

    @property
    def _telemetry_names(self):
        trackers = [self._grad_norm_tracker, self._clipped_fraction_tracker, self._skipped_steps_tracker]
        return {t.name for t in trackers + self._layer_norm_trackers if t is not None}

    def test_step(self, data):
        logs = super().test_step(data)
        return {name: value for name, value in logs.items() if name not in self._telemetry_names}

    # -- the train function and the skip limit ----------------------------------------------------

    def _check_optimizer_clipping(self):
        optimizer = loss_scaling.updating_optimizer(self.optimizer)
        own = [f"{n}={getattr(optimizer, n)}" for n in _OPTIMIZER_CLIPPING if getattr(optimizer, n, None)]
        if own and self.gradient_ops.clips:
            raise ValueError(
                f"Both the optimizer ({', '.join(own)}) and {type(self).__name__} clip the gradient. "
                "Set clipping on the wrapper only: it clips the aggregated gradient."
            )

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        self._check_optimizer_clipping()
        super().make_train_function(force=force)
        if self.max_consecutive_skips is not None:
            step = self.train_function

            def step_then_check(iterator):
                logs = step(iterator)
                self._stop_after_consecutive_skips()
                return logs

            self.train_function = step_then_check
        return self.train_function

    def _stop_after_consecutive_skips(self):
        count = int(self._skip_counter.consecutive.numpy())
        if count >= self.max_consecutive_skips:
            self.stop_training = True
            warnings.warn(
                f"{type(self).__name__}: training stopped after {count} consecutive steps with "
                f"non-finite (NaN/Inf) gradients were skipped (max_consecutive_skips="
                f"{self.max_consecutive_skips}). Check the data for NaN/Inf, lower the learning "
                "rate or clip the gradients.",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- per-step gradient statistics for callbacks --------------------------------------------

    def watch_gradients(self, layers, stage="applied"):
        """Records each step's per-layer L2 norm and max ``|g|`` in a probe.

        Used by :class:`keras_gradops.callbacks.GradientStatsRecorder`. The
        train function is rebuilt so the next ``fit`` writes (or, after
        ``watch_gradients(None)``, stops writing) the probe.

        Args:
            layers: ``True``, a list of layer names or layers of ``self.model``,
                or ``None`` to stop recording.
            stage: ``"applied"`` (after clipping and centralization) or ``"raw"``.

        Returns:
            The :class:`~keras_gradops.training.gradient_probe.GradientProbe`, or ``None``.
        """
        probe = None
        if layers is not None:
            names = [layer.name for layer in resolve_layers(self.model, layers)]
            probe = GradientProbe(names, stage, self.distribute_strategy)
        self._gradient_probe = probe
        self.train_function = None
        return probe

    # -- serialization ------------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
            **self.gradient_ops.get_config(),
            "skip_nonfinite": self.skip_nonfinite,
            "max_consecutive_skips": self.max_consecutive_skips,
            "layer_norms": list(self.layer_norms) or None,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"), custom_objects=custom_objects)
        return cls(model, **config)
