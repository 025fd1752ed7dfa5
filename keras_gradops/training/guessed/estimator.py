"""One step's guessed gradient from forward-mode directional derivatives.

For a layer ``s_l = x_l W_l + b_l`` the weight gradient is
``sum_b x_{l,b}^T (dL/ds_l)_b``; a guess ``y_l`` of ``dL/ds_l`` is injected
as the forward tangent at ``s_l`` of every layer at once, and one
``tf.autodiff.ForwardAccumulator`` pass gives each example's directional
derivative ``d_b = sum_l <dL/ds_l, y_l>_b`` (no backward pass through the
network, no activations kept for one). Then

    g_hat(W_l) = x_l^T (d * y_l),   g_hat(b_l) = sum_b d_b y_{l,b}

(Singhal et al., "How to guess a gradient", arXiv 2312.04709). Weights
outside Dense/Conv2D layers (normalisation scales and offsets; every weight
for ``directional_descent``) get a tangent ``V ~ N(0, I)`` themselves and
``g_hat = (sum_b d_b) V`` (Baydin et al. 2022, "Gradients without
backpropagation").

The tangents enter through one watched scalar ``p = 0`` with tangent 1: each
layer computes ``s_l + p * y_l``, whose value is ``s_l`` and whose tangent
gains ``y_l``, so a guess can depend on the forward pass's own values (masks,
activations) and be drawn only when its layer runs.

``d_b`` is read per example as ``<dL/dy_pred_b, JVP(y_pred)_b>``, with
``dL/dy_pred`` from the loss function alone (the network is differentiated
in forward mode only); this splits the step's loss exactly, with any Keras
loss, sample weights and regularizers (whose gradient, local to each weight,
is added exactly). When a layer mixes the examples (BatchNormalization),
``d_b`` is replaced by ``sum_b d_b``, which keeps activation perturbation
unbiased.
"""

import contextlib
import dataclasses

import tensorflow as tf

from keras_gradops.training.guessed import methods as m
from keras_gradops.training.guessed.guesses import guess
from keras_gradops.training.guessed.noise import SITE_STREAM, VARIABLE_STREAM, draw, fold_in


@dataclasses.dataclass
class GuessResult:
    """What one guessed step computed.

    Attributes:
        loss: the loss as ``loss_fn`` returned it (first guess's forward pass).
        y_pred: the predictions of the first guess's forward pass.
        gradients: list aligned with the variables: the gradient of the
            objective, averaged over the guesses.
        true_gradients: the exact gradient of the first pass's objective (same
            forward pass, same dropout masks), or ``None`` if not asked for.
        draws: one dict per guess, ``{layer name or variable path: draw}``, or
            ``None`` if not asked for.
    """

    loss: tf.Tensor
    y_pred: tf.Tensor
    gradients: list
    true_gradients: list | None = None
    draws: list | None = None


def _per_example_sum(values):
    values = tf.cast(values, tf.float32)
    if values.shape.rank == 1:
        return values
    return tf.reduce_sum(values, axis=list(range(1, values.shape.rank)))


def _times_per_example(d, y):
    d = tf.cast(d, y.dtype)
    return tf.reshape(d, tf.concat([tf.shape(d), tf.ones([y.shape.rank - 1], tf.int32)], 0)) * y


def _after(tensors, x):
    """``x``, available only once every tensor in ``tensors`` (``None`` skipped) is computed.

    The executor runs any op whose inputs are ready; without this, the
    forward pass runs ahead of its tangents (or of the updates), keeping
    every layer's activations alive.
    """
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return x
    with tf.control_dependencies(tensors):
        return tf.identity(x)


def _add(total, value):
    if value is None:
        return total
    return value if total is None else total + value


class GradientGuesser:
    """Guesses the gradient of a loss for the weights of a :class:`LayerStack`.

    Args:
        stack: the checked :class:`~keras_gradops.training.guessed.stack.LayerStack`.
        method: one of :data:`~keras_gradops.training.guessed.methods.METHODS`.
        num_guesses: independent guesses averaged per step (one forward pass each).
        recompute: if ``True``, keep nothing per layer in the first pass; a
            second forward pass with the same seeds rebuilds each layer's input
            and guess for its update, layer after layer: activation memory
            ``O(1)`` in depth for one more forward pass. Control dependencies
            then make each layer of the first pass wait for the previous
            layer's tangent, and each layer of the second pass for the previous
            layer's update, so the executor cannot run ahead and hold
            activations (this costs some overlap, hence only in this mode).
        variables: the trainable variables the gradients align with.
        noise: the distribution of every draw, ``"normal"`` or ``"rademacher"``
            (:mod:`~keras_gradops.training.guessed.noise`).
    """

    def __init__(self, stack, method, num_guesses, recompute, variables, noise="normal"):
        self.stack = stack
        self.noise = noise
        self.method = method
        self.num_guesses = num_guesses
        self.recompute = recompute
        self.variables = list(variables)
        self._position = {id(v): i for i, v in enumerate(self.variables)}
        self.guessed_sites = stack.sites if method in m.ACTIVATION_SPACE_METHODS else []
        site_variables = {id(v) for site in self.guessed_sites for v in site.variables}
        self.perturbed = [v for v in self.variables if id(v) not in site_variables]

    def __call__(self, x, loss_fn, seed, training=True, true_gradient=False, record_draws=False):
        """Guesses the gradient of ``loss_fn`` for one batch.

        Args:
            x: the input batch (one tensor).
            loss_fn: ``y_pred -> (loss, objective)``; the gradient is the
                objective's (e.g. the loss-scaled loss).
            seed: an int64 ``[2]`` tensor; every draw of the step derives from it.
            training: passed to the layers not run by hand.
            true_gradient: also return the exact gradient (costs a backward pass).
            record_draws: also return the random draws.

        Returns:
            A :class:`GuessResult`.
        """
        x = tf.convert_to_tensor(x)
        if self.method == m.BACKPROP:
            return self._backprop(x, loss_fn, training)
        gradients = [None] * len(self.variables)
        true_gradients = None
        passes = []
        for k in range(self.num_guesses):
            tape = tf.GradientTape() if true_gradient and k == 0 else contextlib.nullcontext()
            with tape:
                result = self._guess_pass(x, loss_fn, fold_in(seed, k), training)
            if true_gradient and k == 0:
                true_gradients = tape.gradient(result["objective"], self.variables)
            passes.append(result)
            for v, grad in zip(self.perturbed, result["perturbed_grads"]):
                self._accumulate(gradients, v, grad)
            for i, grad in enumerate(result["regularization_grads"]):
                self._accumulate(gradients, self.variables[i], grad)
        if self.recompute:
            self._recomputed_site_updates(x, [p["d"] for p in passes], seed, training, gradients)
        else:
            for p in passes:
                for site, x_in, y in p["records"]:
                    for v, grad in zip(site.variables, site.weight_update(x_in, _times_per_example(p["d"], y))):
                        self._accumulate(gradients, v, grad)
        if self.num_guesses > 1:
            gradients = [None if g is None else g / tf.cast(self.num_guesses, g.dtype) for g in gradients]
        first = passes[0]
        return GuessResult(
            loss=first["loss"], y_pred=first["y_pred"], gradients=gradients,
            true_gradients=true_gradients,
            draws=[p["draws"] for p in passes] if record_draws else None,
        )

    def _accumulate(self, gradients, variable, value):
        i = self._position[id(variable)]
        gradients[i] = _add(gradients[i], None if value is None else tf.cast(value, variable.dtype))

    def _backprop(self, x, loss_fn, training):
        def exact(site, x_in):
            return site.activate(site.pre_activation(x_in))

        with tf.GradientTape() as tape:
            y_pred = self.stack.run(x, exact, training)
            loss, objective = loss_fn(y_pred)
        gradients = tape.gradient(objective, self.variables)
        return GuessResult(loss=loss, y_pred=y_pred, gradients=gradients, true_gradients=gradients, draws=[{}])

    def _guess_pass(self, x, loss_fn, seed, training):
        """One forward pass with tangents: the per-example derivative ``d`` and what the update needs."""
        tangents = [
            draw(self.noise, fold_in(seed, VARIABLE_STREAM, j), v.shape, v.dtype) for j, v in enumerate(self.perturbed)
        ]
        draws = {v.path: t for v, t in zip(self.perturbed, tangents)}
        records = []
        probe = tf.zeros((), tf.float32)

        def guessed_site(site, x_in):
            s = site.pre_activation(_after([tangent_of(x_in)], x_in))
            y, site_draw = guess(self.method, site, s, self.stack.next_site(site),
                                 fold_in(seed, SITE_STREAM, site.index), self.noise)
            draws[site.layer.name] = site_draw
            if not self.recompute:
                records.append((site, x_in, y))
            return site.activate(s + tf.cast(probe, s.dtype) * y)

        def exact_site(site, x_in):
            return site.activate(site.pre_activation(_after([tangent_of(x_in)], x_in)))

        site_fn = guessed_site if self.guessed_sites else exact_site
        accumulator = tf.autodiff.ForwardAccumulator(
            [probe] + [v.value for v in self.perturbed], [tf.ones(())] + tangents
        )

        def tangent_of(tensor):
            # In the memory mode, a layer waits for the previous layer's tangent.
            return accumulator.jvp(tensor) if self.recompute else None

        with accumulator:
            y_pred = self.stack.run(x, site_fn, training)
        y_pred_tangent = accumulator.jvp(y_pred, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        loss, objective, cotangent, regularization = self._loss_head(loss_fn, y_pred)
        d = _per_example_sum(cotangent * tf.cast(y_pred_tangent, cotangent.dtype))
        total = tf.reduce_sum(d)
        if self.stack.couples_examples:
            d = tf.fill(tf.shape(d), total)
        perturbed_grads = [total * tf.cast(t, tf.float32) for t in tangents]
        return dict(loss=loss, objective=objective, y_pred=y_pred, d=d, records=records, draws=draws,
                    perturbed_grads=perturbed_grads, regularization_grads=regularization)

    def _loss_head(self, loss_fn, y_pred):
        """``dL/dy_pred`` from the loss alone, and the exact gradient of weight regularizers."""
        values = [v.value for v in self.variables]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(y_pred)
            tape.watch(values)
            loss, objective = loss_fn(y_pred)
        cotangent, *regularization = tape.gradient(objective, [y_pred] + values)
        if cotangent is None:
            cotangent = tf.zeros_like(y_pred)
        return loss, objective, cotangent, regularization

    def _recomputed_site_updates(self, x, ds, seed, training, gradients):
        """Second forward pass: rebuild each layer's input and guesses, update it, move on.

        Control dependencies order it: the pass starts once every ``d`` is
        known, and a layer runs only after the previous layer's update, so
        at most one layer's input and guesses are alive at a time.
        """
        x = _after(ds, x)
        previous = []

        def site_update(site, x_in):
            x_in = _after(previous, x_in)
            s = site.pre_activation(x_in)
            next_site = self.stack.next_site(site)
            cotangent = None
            for k, d in enumerate(ds):
                site_seed = fold_in(fold_in(seed, k), SITE_STREAM, site.index)
                y, _ = guess(self.method, site, s, next_site, site_seed, self.noise)
                cotangent = _add(cotangent, _times_per_example(d, y))
            updates = site.weight_update(x_in, cotangent)
            for v, grad in zip(site.variables, updates):
                self._accumulate(gradients, v, grad)
            previous[:] = updates
            return site.activate(s)

        self.stack.run(x, site_update, training)
