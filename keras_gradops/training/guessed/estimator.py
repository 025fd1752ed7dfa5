"""One step's guessed gradient from forward-mode directional derivatives.

For a layer ``s_l = x_l W_l + b_l`` the weight gradient is
``sum_b x_{l,b}^T (dL/ds_l)_b``; a guess ``y_l`` of ``dL/ds_l`` is added to
the forward tangent at ``s_l`` of every layer at once, and one forward pass
with tangents gives each example's directional derivative
``d_b = sum_l <dL/ds_l, y_l>_b`` (no backward pass through the network, no
activations kept for one). Then

    g_hat(W_l) = x_l^T (d * y_l),   g_hat(b_l) = sum_b d_b y_{l,b}

(Singhal et al., "How to guess a gradient", arXiv 2312.04709). Weights
outside Dense/Conv2D layers (normalisation scales and offsets; every weight
for ``directional_descent``) get a tangent ``V ~ N(0, I)`` themselves and
``g_hat = (sum_b d_b) V`` (Baydin et al. 2022, "Gradients without
backpropagation").

The tangent pass is written out layer by layer: a Dense/Conv2D layer's
tangent is ``t_s = t_x W + x V_W + V_b + y`` (the layer is linear in its
input and in its weights) and ``t_a = J_act(s) t_s``; any other layer's
comes from a ``tf.autodiff.ForwardAccumulator`` around that layer alone.

``d_b`` is read per example as ``<dL/dy_pred_b, JVP(y_pred)_b>``, with
``dL/dy_pred`` from the loss function alone (the network is differentiated
in forward mode only); this splits the step's loss exactly, with any Keras
loss, sample weights and regularizers (whose gradient, local to each weight,
is added exactly). When a layer mixes the examples (BatchNormalization),
``d_b`` is replaced by ``sum_b d_b``, which keeps activation perturbation
unbiased.

Memory. The update needs each layer's input and guess once ``d`` is known,
at the end of the pass. Kept, they cost what backprop keeps (every layer's
activations). The first pass keeps them for the first layers only while
they fit in the batch's own size (``recompute="auto"``; all with ``False``,
none with ``True``); a second pass rebuilds every later layer's input and
guess from the same seeds, updates that layer and moves on. The order
(:mod:`~keras_gradops.training.guessed.ordering`) makes each layer of the
first pass wait for its tangent, each draw for its layer, the second pass
for every ``d`` and each of its layers for the previous layer's update, and
under XLA keeps the second pass from being merged into the first: alive at
any time are the weights, the gradient, ``d``, the kept records (at most the
batch's size) and one or two layers' values, tangents and guesses, whatever
the depth.
"""

import collections
import contextlib
import dataclasses

import tensorflow as tf

from keras_gradops.keras_internals import calls_replaced
from keras_gradops.training.guessed.noise import DEFAULT, draw, seed_table, sequence_seed
from keras_gradops.training.guessed.ordering import after, executor_after


@dataclasses.dataclass
class GuessResult:
    """What one guessed step computed.

    Attributes:
        loss: the loss as ``loss_fn`` returned it (first guess's forward pass).
        y_pred: the predictions of the first guess's forward pass.
        gradients: list aligned with the variables: the gradient of the
            objective, averaged over the guesses.
        true_gradients: the exact gradient, or ``None`` if not asked for: for
            a chain, of the first pass's objective (same forward pass, same
            dropout masks); for a model run by its own call, of a backward
            pass of its own (``spsa``'s in inference mode).
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


def _directional_derivatives(cotangent, tangent):
    """Each example's ``<dL/dy_pred_b, JVP(y_pred)_b>`` over every output (``None`` tangents are zero)."""
    terms = [_per_example_sum(c * tf.cast(t, c.dtype))
             for c, t in zip(tf.nest.flatten(cotangent), tf.nest.flatten(tangent)) if t is not None]
    if not terms:
        return tf.zeros(tf.shape(tf.nest.flatten(cotangent)[0])[:1], tf.float32)
    return tf.add_n(terms)


def _times_per_example(d, y):
    d = tf.cast(d, y.dtype)
    return tf.reshape(d, [-1] + [1] * (y.shape.rank - 1)) * y


def _example_bytes(x):
    """Bytes of one example of ``x`` (its first axis is the batch); infinite if a size is unknown."""
    size = x.shape[1:].num_elements()
    return float("inf") if size is None else size * x.dtype.size


def _made(draws):
    """``draws`` with every draw given as a function (made only when asked for, see guesses) made."""
    return {name: draw() if callable(draw) else draw for name, draw in draws.items()}


def _add(total, value):
    if value is None:
        return total
    if total is None:
        return value
    return total + tf.cast(value, total.dtype)


@contextlib.contextmanager
def _forward_mode_through(layer):
    """Turns TensorFlow's missing forward-mode rule for an op (no gradient to differentiate twice) into a clear error."""
    try:
        yield
    except LookupError as error:
        markers = ("gradient registry has no entry", "No gradient defined for operation")
        if not any(marker in str(error) for marker in markers):
            raise
        cause = next((line.strip() for line in str(error).splitlines() if any(m in line for m in markers)), str(error))
        raise ValueError(
            f"TensorFlow cannot carry a forward-mode tangent through {layer.name!r} ({cause}). Under XLA "
            "(jit_compile=True) some Keras ops compile to XLA ops without a derivative rule (ops.slice, as in "
            "keras_hub's PositionEmbedding). Freeze the weights before that op (LoRA, prompt tuning), compile "
            "with jit_compile=False, or use method='spsa' or 'backprop', which need no forward-mode derivative."
        ) from None


class GradientGuesser:
    """Guesses the gradient of a loss for the weights of a :class:`LayerStack`.

    Args:
        stack: the checked :class:`~keras_gradops.training.guessed.stack.LayerStack`.
        method: a :class:`~keras_gradops.training.guessed.methods.GuessingMethod`.
        num_guesses: independent guesses averaged per step (one forward pass each).
        recompute: what the first pass keeps for the updates (see the module
            docstring): ``False``, every layer's input and guess; ``True``,
            nothing: a second forward pass with the same seeds rebuilds every
            layer's input and guess for its update, layer after layer
            (activation memory ``O(1)`` in depth, one more forward pass);
            ``"auto"``, the first layers' inputs and guesses while they take
            no more memory than the batch itself, the rest rebuilt (the
            paper's 3072-128-128-10 MLP keeps all, a deep MLP of equal widths
            none). With ``True`` or ``"auto"`` the stack must repeat exactly
            (no layer drawing random numbers or keeping moving statistics).
        variables: the trainable variables the gradients align with.
        noise: the distribution of every draw, ``"rademacher"`` or ``"normal"``
            (:mod:`~keras_gradops.training.guessed.noise`).
        perturbation_scale: ``spsa``'s step ``eps`` (see :meth:`_zeroth_order_pass`).
    """

    def __init__(self, stack, method, num_guesses, recompute, variables, noise=DEFAULT, perturbation_scale=None):
        self.stack = stack
        self.perturbation_scale = perturbation_scale
        self.noise = noise
        self.method = method
        self.num_guesses = num_guesses
        self.recompute = recompute
        self.variables = list(variables)
        self._position = {id(v): i for i, v in enumerate(self.variables)}
        sites = stack.sites or stack.graph_sites
        self.guessed_sites = sites if method.guesses_activations else []
        site_variables = {id(v) for site in self.guessed_sites for v in site.variables}
        self.perturbed = [v for v in self.variables if id(v) not in site_variables]
        # Seed streams: one per site (its guess), then one per perturbed variable (its tangent).
        self._stream = {id(v): len(sites) + j for j, v in enumerate(self.perturbed)}
        self._streams = len(sites) + len(self.perturbed)

    def __call__(self, x, loss_fn, seed, training=True, true_gradient=False, record_draws=False):
        """Guesses the gradient of ``loss_fn`` for one batch.

        Args:
            x: the input batch: one tensor for a chain, any structure the
                model takes for a model run as one layer.
            loss_fn: ``y_pred -> (loss, objective)``; the gradient is the
                objective's (e.g. the loss-scaled loss).
            seed: an int64 ``[2]`` tensor; every draw of the step derives from it.
            training: passed to the layers not run by hand.
            true_gradient: also return the exact gradient (costs a backward pass).
            record_draws: also return the random draws.

        Returns:
            A :class:`GuessResult`.
        """
        x = tf.nest.map_structure(tf.convert_to_tensor, x)
        if self.method.exact:
            return self._backprop(x, loss_fn, training)
        gradients = [None] * len(self.variables)
        true_gradients = None
        if true_gradient and self.method.zeroth_order:  # at the weights, before they move; in spsa's mode
            true_gradients = self._backprop(x, loss_fn, training=False).gradients
        elif true_gradient and not self.stack.is_chain:
            # A tape around a pass with forward accumulators would differentiate their JVPs' own gradient ops,
            # some of which have no gradient under XLA (a slice's XlaDynamicUpdateSlice): a backward pass of its own.
            true_gradients = self._backprop(x, loss_fn, training).gradients
        passes = []
        streams = self._streams
        seeds = tf.reshape(seed_table(seed, self.num_guesses * streams), [self.num_guesses, streams, 2])
        kept = None  # how many sites keep their records: decided by the first pass, followed by the others
        for k in range(self.num_guesses):
            if self.method.zeroth_order:
                result = self._zeroth_order_pass(x, loss_fn, seeds[k], waits=[p["objective"] for p in passes[-1:]])
            else:
                taped = true_gradient and k == 0 and self.stack.is_chain
                with tf.GradientTape() if taped else contextlib.nullcontext() as tape:
                    result = self._tangent_pass(x, loss_fn, seeds[k], training, kept)
                if taped:
                    true_gradients = tape.gradient(result["objective"], self.variables)
            kept = result["kept"]
            passes.append(result)
            for v, grad in result["perturbed_grads"]:
                self._accumulate(gradients, v, grad)
            for i, grad in enumerate(result["regularization_grads"]):
                self._accumulate(gradients, self.variables[i], grad)
        for p in passes:
            for site, x_in, y in p["records"]:
                for v, grad in zip(site.variables, site.weight_update(x_in, _times_per_example(p["d"], y))):
                    self._accumulate(gradients, v, grad)
        if self.stack.graph_sites and self.recompute:
            self._recomputed_graph_updates(x, [p["d"] for p in passes], seeds, training, gradients)
        if passes[0]["resume"] is not None:
            self._recomputed_site_updates(passes[0]["resume"], [p["d"] for p in passes], seeds, training, gradients)
        if self.num_guesses > 1:
            gradients = [None if g is None else g / tf.cast(self.num_guesses, g.dtype) for g in gradients]
        first = passes[0]
        return GuessResult(
            loss=first["loss"], y_pred=first["y_pred"], gradients=gradients,
            true_gradients=true_gradients,
            draws=[_made(p["draws"]) for p in passes] if record_draws else None,
        )

    def plan(self):
        """``{variable path: rule}``: how each trainable variable's gradient is guessed."""
        method = self.method.name
        if self.method.exact:
            return {v.path: "exact gradient (backprop)" for v in self.variables}
        if self.method.zeroth_order:
            return {v.path: "spsa: (L(theta + eps z) - L(theta - eps z)) / (2 eps) z, weights moved in place"
                    for v in self.variables}
        rules = {}
        for site in self.guessed_sites:
            last = self.method.uses_next_layer and self.stack.next_site(site) is None
            where = f"the pre-activation of {site.layer.name!r}"
            rule = f"activation_perturbation at {where} (the last Dense/Conv2D layer)" if last else f"{method} at {where}"
            rules.update((id(v), rule) for v in site.variables)
        for v in self.perturbed:
            rules[id(v)] = "weight perturbation: (grad L . V) V, a random tangent V on the variable"
        return {v.path: rules[id(v)] for v in self.variables}

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

    def _weight_tangents(self, variables, seeds, x, draws):
        """``V ~ noise`` for each perturbed variable of a layer, drawn once the layer's input ``x`` exists."""
        tangents = []
        for v in variables:
            tangent = draw(self.noise, seeds[self._stream[id(v)]], v.shape, v.dtype, after=tf.nest.flatten(x))
            draws[v.path] = tangent
            tangents.append(tangent)
        return tangents

    def _budget(self, x):
        """Bytes per example the first pass may keep for a chain's updates (see ``recompute``)."""
        if self.recompute is False or not self.stack.is_chain:
            return float("inf")
        batch = _example_bytes(x)
        return 0 if self.recompute is True or batch == float("inf") else batch

    def _tangent_pass(self, x, loss_fn, seeds, training, kept=None):
        """One forward pass with tangents: the per-example derivative ``d`` and what the update needs.

        ``seeds[i]`` seeds site ``i``'s guess, then each perturbed variable's tangent. The records
        ``(site, x_l, y_l)`` of the first ``kept`` guessed sites are kept; with ``kept=None`` this pass
        decides ``kept`` from the budget, and where the second pass resumes: ``(position, x_l)`` of
        the first site without a record, or ``None``.
        """
        draws, records, perturbed = {}, [], []
        budget, used, resume = self._budget(x), 0, None
        decide = kept is None
        kept = 0 if decide else kept
        batch = x
        tangent = None
        ahead = {}  # site index -> its pre-activation, computed by the previous site's guess
        for position, layer in enumerate(self.stack.layers):
            site = self.stack.site_of(layer)
            variables = [v for v in layer.trainable_variables if id(v) in self._stream]
            weight_tangents = self._weight_tangents(variables, seeds, x, draws)
            perturbed += zip(variables, weight_tangents)
            if site is None and not self.stack.is_chain:
                x, tangent = self._model_forward(layer, x, variables, weight_tangents, seeds, training, draws,
                                                 records if not self.recompute else None)
            elif site is None:
                x, tangent = self._layer_forward(layer, x, tangent, variables, weight_tangents, training)
            else:
                x_in = x
                # A pre-activation computed ahead waits for the tangent to reach its layer.
                given = after([tangent], [ahead.pop(site.index)])[0] if ahead.get(site.index) is not None else None
                s, tangent = self._site_tangent(site, x, tangent, weight_tangents, given)
                if site in self.guessed_sites:
                    if decide and kept == site.index and resume is None:
                        # Keep this record if, with the next site's input (shaped as ``s`` or smaller)
                        # to resume from, everything kept stays within the budget.
                        record = self.num_guesses * ((x_in is not batch) * _example_bytes(x_in) + _example_bytes(s))
                        last = self.stack.next_site(site) is None
                        if used + record + (0 if last else _example_bytes(s)) <= budget:
                            used += record
                            kept += 1
                        else:
                            resume = (position, x_in)
                    keep = site.index < kept
                    # Sharing holds the next pre-activation through this guess: one more layer-sized value,
                    # paid only where this layer's record is kept anyway (memory grows with depth there).
                    s_next = ahead[site.index + 1] = self._shared_next_pre_activation(site, s) if keep else None
                    # The guess's draws wait for the tangent's matmul (executor: one layer less alive).
                    (s_guess,) = executor_after([tangent], [s])
                    y, draws[layer.name] = self.method.guess(site, s_guess, self.stack.next_site(site),
                                                             seeds[site.index], self.noise, s_next)
                    tangent = _add(tangent, y)
                    if keep:
                        records.append((site, x_in, y))
                tangent = None if tangent is None else site.push_forward(s, tangent)
                # The output waits for the tangent: the forward pass cannot run ahead of it, and the
                # activation can overwrite ``s``, which the tangent needed.
                (s,) = after([tangent], [s])
                x = site.activate(s)
        y_pred = x
        loss, objective, cotangent, regularization = self._loss_head(loss_fn, y_pred)
        if tangent is None:
            tangent = tf.nest.map_structure(lambda _: None, y_pred)
        d = _directional_derivatives(cotangent, tangent)
        total = tf.reduce_sum(d)
        if self.stack.couples_examples:
            d = tf.fill(tf.shape(d), total)
        perturbed_grads = [(v, total * tf.cast(t, tf.float32)) for v, t in perturbed]
        return dict(loss=loss, objective=objective, y_pred=y_pred, d=d, records=records, kept=kept, resume=resume,
                    draws=draws, perturbed_grads=perturbed_grads, regularization_grads=regularization)

    def _zeroth_order_pass(self, x, loss_fn, seeds, waits=()):
        """One SPSA guess (MeZO's estimator; Spall 1992; Malladi et al. 2023, arXiv 2305.17333).

        With ``z ~ noise`` drawn from each variable's seed and ``eps`` the
        perturbation scale, the weights move in place,
        ``theta + eps z`` (loss ``L+``), ``theta - eps z`` (``L-``), back to
        ``theta``, and the guess is

            g_hat = (L+ - L-) / (2 eps) * z,

        an estimate of ``(grad L . z) z`` (directional descent's guess) to
        ``O(eps^2)``. ``z`` is never stored: each move draws it again from the
        seed, after the loss before it (so it can neither be drawn early nor,
        under XLA, merged with an earlier draw); the last move's ``z`` gives
        the guess. Memory is a forward pass's, as for inference. As in MeZO
        the two forward passes run in inference mode (``training=False``):
        dropout off and BatchNormalization reading its moving statistics, so
        both see the same function. The restored weights equal ``theta`` up to
        float rounding (a few ulps). Reports the mean of ``L+`` and ``L-``
        (``L(theta) + O(eps^2)``) and the second pass's predictions.
        """
        eps = self.perturbation_scale
        directions = []

        def move(scale, waits):
            directions.clear()
            for v in self.variables:
                z = draw(self.noise, seeds[self._stream[id(v)]], v.shape, v.dtype, after=waits)
                v.assign_add(z * tf.cast(scale, v.dtype))
                directions.append(z)
                waits = [z]  # one variable's draw after another's: never all of them at once

        def loss_at(scale, waits):
            move(scale, waits)
            y_pred = self.stack.run(x, None, training=False)
            loss, objective = loss_fn(y_pred)
            return y_pred, loss, tf.cast(objective, tf.float32)

        _, loss_plus, objective_plus = loss_at(eps, [*waits, *tf.nest.flatten(x)])
        y_pred, loss_minus, objective_minus = loss_at(-2.0 * eps, [objective_plus])
        move(eps, [objective_minus])
        projected = (objective_plus - objective_minus) / (2.0 * eps)
        return dict(loss=(loss_plus + loss_minus) / 2, objective=objective_minus, y_pred=y_pred, d=None, records=[],
                    kept=0, resume=None, draws={v.path: z for v, z in zip(self.variables, directions)},
                    perturbed_grads=[(v, projected * tf.cast(z, tf.float32)) for v, z in zip(self.variables, directions)],
                    regularization_grads=[])

    def _shared_next_pre_activation(self, site, s):
        """The next site's pre-activation for ``one_layer_downstream``'s guess, which that site then uses too.

        It saves that site's matmul (16x1024 MLP under XLA: 2.49 -> 1.90 of a
        Keras step) but lives through the guess: XLA's buffers for the step
        went from 4 to 6 layers, so only layers whose records the first pass
        keeps share it.

        ``None`` for other methods, the last site, or when layers other than
        reshapes stand between (the guess treats those as the identity).
        """
        next_site = self.stack.next_site(site)
        if not self.method.shares_next_pre_activation or next_site is None or not site.exact_next_input:
            return None
        return next_site.pre_activation(site.to_next_input(site.activate(s)))

    @staticmethod
    def _site_tangent(site, x, tangent, weight_tangents, s=None):
        """``s = x W + b`` (unless given) and its tangent ``t_x W + x V_W + V_b`` (``None`` if nothing moves it).

        Without XLA the tangent's matmul waits for ``s``: run side by side,
        ``x``, ``t_x``, ``s`` and ``t_s`` were alive at once (four layers;
        in turn, three: ``x`` is freed before ``t_x W`` is made).
        """
        s = site.pre_activation(x) if s is None else s
        t_s = None if tangent is None else site.linear(executor_after([s], [tangent])[0], site.kernel)
        if weight_tangents:
            t_s = _add(t_s, site.linear(x, *weight_tangents))
        return s, t_s

    @staticmethod
    def _layer_forward(layer, x, tangent, variables, weight_tangents, training):
        """Any other layer, with its tangent from a forward accumulator around it alone."""
        primals = ([x] if tangent is not None else []) + [v.value for v in variables]
        if not primals:
            return layer(x, training=training), None
        tangents = ([tangent] if tangent is not None else []) + weight_tangents
        with _forward_mode_through(layer), tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
            output = layer(x, training=training)
        return output, accumulator.jvp(output)

    def _model_calls(self, sites, site_call):
        """Replaces the call of each site in ``sites`` by ``site_call(site, x, number)`` (``number``: which call
        of the layer this is in the pass, for a layer the model calls more than once)."""
        numbers = collections.Counter()

        def replacement(site):
            def call(inputs, *args, **kwargs):
                number = numbers[id(site)]
                numbers[id(site)] += 1
                return site_call(site, inputs, number)
            return call

        return calls_replaced({site.layer: replacement(site) for site in sites})

    def _graph_guess(self, site, s, seed, number):
        """This method's guess at a graph site's call ``number``, from the site's seed."""
        return self.method.guess(site, s, None, sequence_seed(seed, number), self.noise)

    def _model_forward(self, model, x, variables, weight_tangents, seeds, training, draws, records):
        """The model's own call with tangents: ``V`` on the perturbed ``variables``, a guess at each graph site.

        Each linear layer's tangent is computed by hand, as it is linear in
        its input and weights: ``t_s = t_x K + x t_K + t_b`` (plus the guess
        ``y`` at a graph site), and handed to the accumulator as
        ``act(s + c t_s)`` with ``s`` computed without tangents and ``c`` a
        zero watched with tangent 1: the value is the layer's own, the
        tangent ``t_s``. The accumulator differentiates everything else
        (activations, normalisation, attention's softmax) itself; through a
        matmul or einsum its rule (the gradient's gradient) materialised
        kernel-sized tensors per example. The output's tangent gives
        ``d_b = sum_l <dL/ds_l, y_l>_b + <grad, V>_b``; ``records`` (``None``:
        rebuilt by a second pass) gets each guessed call's ``(site, x_l, y_l)``.
        """
        injection = tf.zeros([], tf.float32)
        guessed = {id(site) for site in self.stack.graph_sites}

        def linear_call(site, inputs, number):
            layer = site.layer
            kernel = tf.convert_to_tensor(layer.kernel)
            bias = None if layer.bias is None else tf.convert_to_tensor(layer.bias)
            t_x, t_kernel, t_bias = (None if value is None else accumulator.jvp(value)
                                     for value in (inputs, kernel, bias))
            x_, kernel, bias = (None if value is None else tf.stop_gradient(value) for value in (inputs, kernel, bias))
            s = site.linear(x_, kernel, bias)
            tangent = None if t_x is None else site.linear(t_x, kernel)
            if t_kernel is not None or t_bias is not None:
                tangent = _add(tangent, site.linear(x_, tf.zeros_like(kernel) if t_kernel is None else t_kernel,
                                                    t_bias))
            if id(site) in guessed:
                y, draws[layer.name + (f"/{number}" if number else "")] = self._graph_guess(
                    site, s, seeds[site.index], number)
                if records is not None:
                    records.append((site, inputs, y))
                tangent = _add(tangent, y)
            if tangent is not None:
                s = s + tf.cast(injection, s.dtype) * tf.stop_gradient(tf.cast(tangent, s.dtype))
            return site.activate(s)

        primals = [v.value for v in variables] + [injection]
        tangents = list(weight_tangents) + [tf.ones([])]
        with _forward_mode_through(model), tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
            with self._model_calls(self.stack.linear_layers, linear_call):
                output = model(x, training=training)
        return output, accumulator.jvp(output)

    def _recomputed_graph_updates(self, x, ds, seeds, training, gradients):
        """Second run of the model's own call, once every ``d`` is known: each site rebuilds its guesses from
        the seeds, adds ``x_l^T (d * y_l)`` and lets the model go on only then (one site's values at a time)."""
        flat = tf.nest.flatten(x)
        *flat, seeds = after(ds, [*flat, seeds])
        x = tf.nest.pack_sequence_as(x, flat)

        def updating_call(site, inputs, number):
            s = site.pre_activation(inputs)
            s = self._rebuilt_update(site, inputs, s, ds, gradients,
                                     lambda k: self._graph_guess(site, s, seeds[k, site.index], number))
            return site.activate(s)

        with self._model_calls(self.stack.graph_sites, updating_call):
            self.stack.layers[0](x, training=training)

    def _rebuilt_update(self, site, x_in, s, ds, gradients, guess):
        """Adds ``x_l^T (sum_k d_k * y_k)`` with ``y_k = guess(k)[0]`` (guess ``k``'s draw made again) to the
        site's gradients; returns ``s``, available only once the update is made (one site's values at a time)."""
        cotangent = None
        for k, d in enumerate(ds):
            y, _ = guess(k)
            cotangent = _add(cotangent, _times_per_example(d, y))
        updates = site.weight_update(x_in, cotangent)
        for v, grad in zip(site.variables, updates):
            self._accumulate(gradients, v, grad)
        (s,) = after(updates, [s])
        return s

    def _loss_head(self, loss_fn, y_pred):
        """``dL/dy_pred`` from the loss alone, and the exact gradient of weight regularizers."""
        values = [v.value for v in self.variables]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(y_pred)
            tape.watch(values)
            loss, objective = loss_fn(y_pred)
        cotangent, *regularization = tape.gradient(objective, [y_pred] + values)
        cotangent = tf.nest.map_structure(lambda c, y: tf.zeros_like(y) if c is None else c, cotangent, y_pred)
        return loss, objective, cotangent, regularization

    def _recomputed_site_updates(self, resume, ds, seeds, training, gradients):
        """Second forward pass from the first site without a record: rebuild each layer's guesses, update it, move on.

        It starts once every ``d`` is known, from new values (to XLA) of the
        first site's kernel and the seeds, so nothing in it is merged with
        the first pass; each layer's output waits for its update, so at most
        one layer's input and guesses are alive at a time. (No layer shares
        its next pre-activation here: that would keep one more.)
        """
        position, x_in = resume
        first = self.stack.site_of(self.stack.layers[position])
        first_kernel, seeds = after(ds, [tf.convert_to_tensor(first.kernel.value), seeds])

        def site_update(site, x_in):
            kernel = first_kernel if site is first else site.kernel
            s = site.linear(x_in, kernel, site.bias)
            if site not in self.guessed_sites:
                return site.activate(s)
            next_site = self.stack.next_site(site)
            s = self._rebuilt_update(site, x_in, s, ds, gradients,
                                     lambda k: self.method.guess(site, s, next_site, seeds[k, site.index], self.noise))
            return site.activate(s)

        self.stack.run(x_in, site_update, training, start=position)
