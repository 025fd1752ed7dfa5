"""GuessedGradientModel: ``model.fit`` with forward-mode guessed gradients, no backpropagation.

    mlp = keras.Sequential([keras.Input((3072,)), keras.layers.Dense(128, activation="relu"),
                            keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)])
    model = kgo.GuessedGradientModel(mlp, method="weight_transpose")
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=..., jit_compile=True)
    model.fit(train_ds, epochs=..., validation_data=test_ds)
"""

import keras
import tensorflow as tf

from keras_gradops import replicas
from keras_gradops.training import loss_scaling
from keras_gradops.training.guessed import methods as m
from keras_gradops.training.guessed.diagnostics import cosine_similarity
from keras_gradops.training.guessed.estimator import GradientGuesser
from keras_gradops.training.guessed.noise import as_seed, fold_in
from keras_gradops.training.guessed.stack import LayerStack
from keras_gradops.training.layer_groups import resolve_layers, variable_groups
from keras_gradops.training.gradient_ops_model import GradientOpsModel


@keras.saving.register_keras_serializable(package="keras_gradops")
class GuessedGradientModel(GradientOpsModel):
    """Trains a Keras model with guessed gradients: one forward-mode pass, no backward pass.

    Each step guesses ``dL/ds_l`` at every Dense/Conv2D pre-activation ``s_l``
    (Singhal et al., "How to guess a gradient", arXiv 2312.04709), scores all
    guesses at once with one forward pass carrying tangents, which gives each
    example's directional derivative ``d_b``, and updates ``W_l`` with
    ``x_l^T (d * y_l)``. Methods (``V``, ``y``, ``eps`` and ``M`` are drawn
    from ``noise``, mean 0 and covariance ``I``):

    - ``"directional_descent"``: weight perturbation, a tangent ``V`` on the
      weights, ``g_hat = (dL . V) V`` (Baydin et al. 2022).
    - ``"activation_perturbation"``: ``y_l`` drawn at ``s_l``; unbiased.
    - ``"weight_transpose"``: ``y_l = (eps W_{l+1}^T) * 1[s_l > 0]``, ``eps``
      drawn at the next layer's pre-activation.
    - ``"activation_mixing"``: ``y_l = (M act(s_l)) * 1[s_l > 0]``, ``M`` a
      random ``B x B`` mixing of the batch's own outputs. Its expected guess
      is ``C g`` with ``C`` the uncentered second moment of the outputs: feed
      centered (standardized) inputs. On non-negative inputs (pixels in
      [0, 1]) it pushed every first-layer ReLU down at once and killed them
      (CIFAR-10, ``examples/guessing_gradients_cifar10.py``).
    - ``"one_layer_downstream"``: ``eps`` at the next layer's output pulled back
      through that layer's true Jacobian.
    - ``"spsa"``: a zeroth-order guess, MeZO's estimator (Malladi et al. 2023,
      arXiv 2305.17333): the trainable weights move in place to
      ``theta + eps z`` and ``theta - eps z`` (``z`` drawn from a seed, never
      stored), ``g_hat = (L+ - L-) / (2 eps) z``; two forward passes in
      inference mode, no derivative: a forward pass's memory.
    - ``"backprop"``: the exact gradient, as the oracle.

    Which models: ``directional_descent``, ``spsa`` and ``backprop`` train any
    built Keras model (functional graphs with residuals, transformers,
    keras_hub backbones under a head, nested and subclassed models), running
    its own call; the activation-space methods train chains (a Sequential, or
    a functional model where every layer takes the previous layer's output).
    Only trainable variables are guessed: frozen weights (``trainable=False``,
    LoRA's base kernels after ``enable_lora``) stay bit-for-bit unchanged.
    :meth:`guess_plan` lists the rule each trainable variable gets.

    ``weight_transpose`` and ``one_layer_downstream`` guess the last layer by
    activation perturbation. Masks are the activation's Jacobian (``1[s > 0]``
    for ReLU). Train step, gradient ops, telemetry, ``predict``, ``evaluate``,
    saving and ``export`` are those of
    :class:`~keras_gradops.GradientOpsModel`.

    Args:
        model: a built Keras model (see
            :mod:`keras_gradops.training.guessed.stack` for the models and
            layers each method supports).
        method: one of the methods above.
        num_guesses: independent guesses averaged per step (one forward pass each).
        recompute: where the update gets each layer's input and guess, which
            it needs once ``d`` is known (activation-space methods):
            ``"auto"`` (default) keeps those of the first layers while they
            take no more memory than the batch itself and rebuilds the rest in
            a second forward pass with the same seeds, layer after layer:
            activation memory ``O(1)`` in depth, under XLA and without it (the
            paper's 3072-128-128-10 MLP keeps all, so no second pass; a deep
            MLP of equal widths keeps none). ``True`` rebuilds every layer,
            ``False`` keeps every layer (backprop's memory, twice over). A
            stack with a layer that draws random numbers or keeps moving
            statistics (Dropout, BatchNormalization) cannot run twice:
            ``"auto"`` then keeps every layer and ``True`` raises. See
            :mod:`~keras_gradops.training.guessed.estimator`.
        cosine_diagnostics: if ``True``, log ``cosine_similarity`` and
            ``cosine_similarity/<layer>`` (epoch means) between the guess and
            the true gradient; costs a backward pass per step.
        seed: int seed of the guesses' random draws (``None``: random).
        noise: the distribution of every random draw: ``"rademacher"``
            (``+-1``; the default, ``None``) or ``"normal"`` (the paper's
            ``N(0, 1)``, for exact reproduction). Same mean and covariance, so
            the same expected guess; a 64-bit word gives 64 signs, which
            cuts the guessed step's overhead (see
            ``benchmarks/guessed_gradients.py``).
        perturbation_scale: ``spsa``'s step ``eps`` (default ``1e-3``, MeZO's);
            an error for other methods.
        **kwargs: :class:`~keras_gradops.GradientOpsModel` arguments (gradient ops, ...).

    Raises:
        ValueError: an unknown method, ``num_guesses < 1``, a model that is not
            built, has no trainable weights, is not a chain for an
            activation-space method, or holds a layer the method does not
            support (the message names the methods that do), an unknown
            ``noise`` or ``recompute``, a ``perturbation_scale`` that is not
            a positive number or is given to a method other than ``spsa``.

    Example:
        >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
        ...                         keras.layers.Dense(2)])
        >>> model = GuessedGradientModel(net, method="weight_transpose", seed=0)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> [tuple(g.shape) for g in model.guess_gradients(np.ones((5, 3)), np.zeros((5, 2)))]
        [(3, 4), (4,), (4, 2), (2,)]
    """

    def __init__(self, model, method, num_guesses=1, recompute="auto", cosine_diagnostics=False, seed=None,
                 noise=None, perturbation_scale=None, **kwargs):
        guessing = m.get(method)
        distribution = m.validate_noise(noise, guessing)
        scale = m.validate_perturbation_scale(perturbation_scale, guessing)
        m.validate_num_guesses(num_guesses, guessing)
        m.validate_recompute(recompute, guessing)
        if not isinstance(cosine_diagnostics, bool):
            raise ValueError(f"`cosine_diagnostics` must be a bool. Received: cosine_diagnostics={cosine_diagnostics!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an int or None. Received: seed={seed!r}")
        stack = LayerStack(model, guessing, recompute, num_guesses) if isinstance(model, keras.Model) else None
        super().__init__(model, **kwargs)
        self.method = guessing.name
        self._guessing = guessing
        self.num_guesses = num_guesses
        self.recompute = recompute
        self.cosine_diagnostics = cosine_diagnostics
        self.seed = seed
        self.noise = noise
        self.perturbation_scale = perturbation_scale
        self._scale = scale
        self._distribution = distribution
        self._stack = stack
        self._guesser = None
        self._seed_generator = keras.random.SeedGenerator(seed, name="guess_seed_generator")
        self._cosine_layers = [layer.name for layer in resolve_layers(model, True)] if cosine_diagnostics else []
        self._cosine_tracker = keras.metrics.Mean(name="cosine_similarity") if cosine_diagnostics else None
        self._layer_cosine_trackers = [keras.metrics.Mean(name=f"cosine_similarity/{n}") for n in self._cosine_layers]

    @property
    def guesser(self):
        """The :class:`~keras_gradops.training.guessed.estimator.GradientGuesser` of this model."""
        if self._guesser is None:
            self._guesser = GradientGuesser(
                self._stack, self._guessing, self.num_guesses, self._stack.recompute, self.trainable_variables,
                self._distribution, self._scale
            )
        return self._guesser

    def guess_plan(self):
        """How each trainable variable's gradient is guessed: ``{variable path: rule}``.

        Frozen variables (``trainable=False``, LoRA's base kernels) are not
        listed: they get no gradient and never change.

        Example:
            >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu", name="hidden"),
            ...                         keras.layers.Dense(2, name="out")], name="net")
            >>> for path, rule in GuessedGradientModel(net, method="weight_transpose").guess_plan().items():
            ...     print(path, "->", rule)
            net/hidden/kernel -> weight_transpose at the pre-activation of 'hidden'
            net/hidden/bias -> weight_transpose at the pre-activation of 'hidden'
            net/out/kernel -> activation_perturbation at the pre-activation of 'out' (the last Dense/Conv2D layer)
            net/out/bias -> activation_perturbation at the pre-activation of 'out' (the last Dense/Conv2D layer)
        """
        return self.guesser.plan()

    def _guess(self, x, y, sample_weight, seed, true_gradient=False, record_draws=False):
        inputs = x
        if self._stack.is_chain:
            inputs = tf.nest.flatten(x)
            if len(inputs) != 1:
                raise ValueError(f"A chain takes one input tensor; received {len(inputs)}.")
            inputs = inputs[0]
        if self._guessing.zeroth_order and tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise ValueError(
                "method='spsa' moves the weights in place, which a distribution strategy's replicas cannot do "
                "each on its own batch; train it without a strategy (or with one replica)."
            )

        def loss_fn(y_pred):
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            return loss, self.optimizer.scale_loss(loss)

        result = self.guesser(inputs, loss_fn, seed, training=True, true_gradient=true_gradient,
                              record_draws=record_draws)
        scale = loss_scaling.loss_scale(self.optimizer)
        result.gradients = loss_scaling.unscale(result.gradients, scale)
        if result.true_gradients is not None:
            result.true_gradients = loss_scaling.unscale(result.true_gradients, scale)
        return result

    def compute_gradients(self, x, y, sample_weight):
        """The guessed gradient of this replica's loss (see the class docstring).

        Under a distribution strategy each replica folds its index into the
        step's seed: the replicas' guesses are independent, and the step
        applies their mean (a ``num_replicas``-guess average of the batch).
        """
        seed = self._seed_generator.next()
        replica = replicas.replica_id()
        if replica is not None:
            seed = fold_in(seed, replica)
        result = self._guess(x, y, sample_weight, seed, true_gradient=self.cosine_diagnostics)
        if self.cosine_diagnostics:
            self._track_cosine(result.gradients, result.true_gradients)
        return result.loss, result.y_pred, result.gradients

    def _track_cosine(self, guessed, exact):
        self._cosine_tracker.update_state(cosine_similarity(guessed, exact))
        layers = resolve_layers(self.model, self._cosine_layers)
        for tracker, group in zip(self._layer_cosine_trackers, variable_groups(layers, self.trainable_variables)):
            tracker.update_state(cosine_similarity([guessed[i] for i in group], [exact[i] for i in group]))

    def guess_gradients(self, x, y, sample_weight=None, seed=None, return_draws=False):
        """The guessed gradient of the compiled loss for one batch, as ``train_step`` computes it.

        Args:
            x, y, sample_weight: one batch.
            seed: an int or a pair of ints fixing the random draws; ``None``
                draws from the model's seed generator (as ``train_step``).
            return_draws: also return the random draws.

        Returns:
            A list aligned with ``self.trainable_variables`` (not loss-scaled);
            with ``return_draws``, ``(gradients, draws)``: ``draws`` has one
            dict per guess mapping each guessed layer's name to its draw
            (noise shaped as its pre-activation, ``eps`` at the
            next layer, or the ``B x B`` mixing matrix) and each weight-perturbed
            variable's path to its tangent.

        Raises:
            ValueError: the model is not compiled.
        """
        if not self.compiled:
            raise ValueError("`guess_gradients` needs the compiled loss: call `compile()` first.")
        seed = self._seed_generator.next() if seed is None else as_seed(seed)
        result = self._guess(x, y, sample_weight, seed, record_draws=return_draws)
        return (result.gradients, result.draws) if return_draws else result.gradients

    @property
    def _telemetry_names(self):
        names = super()._telemetry_names
        cosine = [self._cosine_tracker] if self._cosine_tracker is not None else []
        return names | {t.name for t in cosine + self._layer_cosine_trackers}

    def get_config(self):
        config = super().get_config()
        config.update(method=self.method, num_guesses=self.num_guesses, recompute=self.recompute,
                      cosine_diagnostics=self.cosine_diagnostics, seed=self.seed, noise=self.noise,
                      perturbation_scale=self.perturbation_scale)
        return config
