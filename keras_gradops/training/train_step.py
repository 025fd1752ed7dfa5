"""The train step every wrapper model shares: gradient source, hand-over to the optimizer, telemetry.

Per step:

1. the gradient source (:meth:`ChainTrainStep.compute_gradients`: backprop
   here, a forward-mode guess in :mod:`keras_gradops.training.guessed`) gives
   each replica's gradient;
2. with ``skip_nonfinite`` (or a dynamic loss scale), a step whose aggregated
   gradient would hold a NaN/Inf is skipped before anything changes
   (:mod:`keras_gradops.pipeline.guard`);
3. ``optimizer.apply`` of any Keras optimizer: Keras sums the replicas'
   gradients (the step's one all-reduce), the gradient chain
   (:mod:`keras_gradops.pipeline.chain`: clipping, then centralization) runs
   on that sum in :meth:`ChainTrainStep._on_aggregated_gradients`, and the
   optimizer updates with the result;
4. telemetry (:mod:`keras_gradops.training.telemetry`) as epoch means.
"""

import keras
import tensorflow as tf

from keras_gradops import keras_internals
from keras_gradops.pipeline import guard
from keras_gradops.training import loss_scaling, multi_worker
from keras_gradops.training.layer_groups import resolve_layers, variable_groups


class ChainTrainStep:
    """The train and test steps of :class:`~keras_gradops.GradientOpsModel`.

    A mixin for a ``keras.Model`` that holds the wrapped network (``model``),
    a built-on-demand :class:`~keras_gradops.pipeline.chain.GradientChain`
    (``gradient_chain``), its :class:`~keras_gradops.training.telemetry.Telemetry`,
    ``skip_nonfinite`` and a :class:`~keras_gradops.training.skip_limit.SkipLimit`.
    """

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
        self._apply_gradients(gradients)
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        return multi_worker.reducible_logs(logs, self.distribute_strategy)

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
        tracker = keras_internals.loss_tracker(self)
        if tracker is None:
            return
        batch_size = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
        replicas_in_sync = tf.distribute.get_strategy().num_replicas_in_sync
        tracker.update_state(loss * tf.cast(replicas_in_sync, loss.dtype), sample_weight=batch_size)

    def _apply_gradients(self, gradients):
        """``optimizer.apply`` of this replica's gradient, guarded when asked or loss-scaled.

        The optimizer sums the replicas' gradients and then calls
        :meth:`_on_aggregated_gradients` (installed in :meth:`make_train_function`).
        """
        optimizer = loss_scaling.updating_optimizer(self.optimizer)
        variables = self.trainable_variables

        def apply(gradients):
            optimizer.apply(gradients, variables)
            loss_scaling.after_finite_step(self.optimizer)

        gradients = loss_scaling.for_apply(gradients, optimizer)
        if not (self.skip_nonfinite or optimizer is not self.optimizer):
            apply(gradients)
            return
        def skip():
            loss_scaling.after_nonfinite_step(self.optimizer)
            if self._gradient_probe is not None:
                self._gradient_probe.record_skipped()

        applied = guard.apply_if_finite(apply, gradients, skip)
        self._telemetry.record_skip(applied)
        if self.skip_nonfinite:
            self._skip_limit.record(applied)

    def _on_aggregated_gradients(self, gradients, variables):
        """The gradient chain and telemetry on the gradient the optimizer has summed over replicas."""
        if self._positions is None:
            self._positions = {id(v.value): i for i, v in enumerate(self.trainable_variables)}
            self.gradient_chain.build(self.trainable_variables, model=self.model)
        indices = [self._positions[id(v)] for v in variables]
        applied, statistics = self.gradient_chain(gradients, variables, indices)
        raw = [None] * len(self._positions)
        for gradient, index in zip(gradients, indices):
            raw[index] = gradient
        layers = resolve_layers(self.model, list(self.layer_norms)) if self.layer_norms else []
        self._telemetry.record_step(statistics, raw, variable_groups(layers, self.trainable_variables))
        probe = self._gradient_probe
        if probe is not None:
            groups = variable_groups(resolve_layers(self.model, list(probe.layer_names)), self.trainable_variables)
            if probe.stage == "applied":
                raw = [None] * len(raw)
                for gradient, index in zip(applied, indices):
                    raw[index] = gradient
            probe.record(raw, groups)
        return applied

    @property
    def _telemetry_names(self):
        return self._telemetry.names

    def test_step(self, data):
        logs = super().test_step(data)
        logs = {name: value for name, value in logs.items() if name not in self._telemetry_names}
        return multi_worker.reducible_logs(logs, self.distribute_strategy)

