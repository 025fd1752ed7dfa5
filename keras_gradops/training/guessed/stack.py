"""A model's layers: run layer by layer (a chain) or by the model's own call.

Two ways to run a model for a guessed step:

- A chain (a Sequential or single-input, single-output chain functional
  model; a nested chain runs as its own layers) is run layer by layer: Dense
  and Conv2D layers ("sites") with the same Keras ops as their own ``call``,
  every other layer through its ``__call__``. ``weight_transpose`` and
  ``one_layer_downstream``, which pull a guess back through the next site's
  kernel, need this; ``activation_perturbation`` and ``activation_mixing``
  use it for chains whose layers its rules accept.
- Any other built model (functional graphs with residuals, attention,
  embeddings; nested, multi-input and subclassed models; keras_hub backbones
  under a head) runs as one layer: its own call walks its graph. The
  activation-space methods reach its linear layers there
  (:mod:`~keras_gradops.training.guessed.graph`); ``directional_descent``,
  ``spsa`` and ``backprop`` always run this way.

Which layers each method supports (anything else raises at construction,
naming the layer and the methods that support it):

- ``backprop``, ``spsa`` (two forward passes, no derivative): every layer.
- ``directional_descent``, and ``activation_perturbation`` and
  ``activation_mixing`` by the model's own call: every layer but recurrent
  ones (forward-mode differentiation of their loop fails inside
  ``tf.function``) and activity regularizers (a loss inside a layer call).
- ``weight_transpose``, ``one_layer_downstream`` (a chain): Dense and Conv2D
  sites, normalisation layers, layers without trainable weights; between two
  sites only Flatten and Reshape layers, which their guesses transpose
  exactly, and Dropout and normalisation layers, which their guesses treat as
  the identity. A Conv2D site's transposed kernel ``K^T`` is the transposed
  convolution (the convolution's gradient in its input).

Trainable weights outside sites (normalisation scales and offsets,
embeddings, prompt tokens) are guessed by weight perturbation (a random
tangent on the weights, as ``directional_descent``) in every method.
"""

import keras
import tensorflow as tf

from keras_gradops.keras_internals import all_layers, node_inputs, producing_layer
from keras_gradops.training.guessed import methods as m
from keras_gradops.training.guessed.graph import activation_pull_back, linear_layers, linear_map
from keras_gradops.training.guessed.kernel_gradient import kernel_gradient

# The normalisation layers the installed Keras has (an older Keras lacks the newer ones, RMSNormalization).
NORMALIZATION_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in ("BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization",
                 "UnitNormalization")
    if hasattr(keras.layers, name)
)
# Between two sites, weight_transpose and one_layer_downstream model these as the identity...
_IDENTITY_IN_GUESS = (keras.layers.Dropout, *NORMALIZATION_LAYERS)
# ... and apply these (linear maps, transposed exactly).
_RESHAPES = (keras.layers.Flatten, keras.layers.Reshape)


class Site:
    """A Dense or Conv2D layer run by hand: ``s = x W + b``, output ``activation(s)``.

    Args:
        layer: a built ``keras.layers.Dense`` or ``keras.layers.Conv2D`` whose
            trainable weights are exactly its kernel and bias.
        index: its position among the stack's sites.

    Attributes:
        reshapes: the Flatten and Reshape layers between this site and the
            next, which ``weight_transpose`` and ``one_layer_downstream``
            apply (set by :class:`LayerStack` for those methods).
        exact_next_input: whether those are all the layers between, so that
            ``to_next_input(activate(s))`` is the next site's real input.
    """

    def __init__(self, layer, index):
        self.layer = layer
        self.index = index
        self.kernel = layer.kernel
        self.bias = layer.bias
        self.variables = [self.kernel] + ([self.bias] if self.bias is not None else [])
        self.is_dense = isinstance(layer, keras.layers.Dense)
        self.reshapes = ()
        self.exact_next_input = False

    def to_next_input(self, a):
        """The next site's input as the guesses see it: the output ``a`` through ``self.reshapes``."""
        for layer in self.reshapes:
            a = layer(a)
        return a

    @property
    def units(self):
        """The size of the last axis of ``s``."""
        return int(self.kernel.shape[-1])

    def pre_activation(self, x):
        """``s = x W + b`` (Dense) or ``conv(x, W) + b`` (Conv2D), in the layer's compute dtype."""
        return self.linear(x, self.kernel, self.bias)

    def linear(self, x, kernel, bias=None):
        """``x K + b`` (Dense) or ``conv(x, K) + b`` (Conv2D) for any ``K`` and ``b`` shaped as the weights.

        The layer's map is linear in ``x`` and in ``(K, b)``, so this is also
        its forward derivative: ``linear(t_x, W)`` along an input tangent,
        ``linear(x, V_W, V_b)`` along a weight tangent
        (:func:`~keras_gradops.training.guessed.graph.linear_map`).
        """
        return linear_map(self.layer, x, kernel, bias)

    def activate(self, s):
        """The layer's output ``activation(s)``."""
        return self.layer.activation(s)

    def pull_back(self, s, cotangent):
        """``J_act(s)^T cotangent``: for ReLU ``cotangent * 1[s > 0]``."""
        return activation_pull_back(self.layer.activation, s, cotangent)

    def push_forward(self, s, tangent):
        """``J_act(s) tangent``, the forward derivative of the activation: for ReLU ``tangent * 1[s > 0]``."""
        activation = self.layer.activation
        if activation in (keras.activations.linear, keras.activations.relu):
            return self.pull_back(s, tangent)  # a diagonal Jacobian is its own transpose
        with tf.autodiff.ForwardAccumulator(s, tangent) as accumulator:
            a = activation(s)
        return accumulator.jvp(a)

    def pre_activation_shape(self, x):
        """The shape of ``s`` for the input ``x``, without computing ``s`` when it is known statically."""
        if self.is_dense:
            return tf.concat([tf.shape(x)[:-1], [self.units]], axis=0)
        shape = self.layer.compute_output_shape(tuple(x.shape))
        if None in shape[1:]:  # the spatial size is known only at run time
            return tf.shape(self.pre_activation(x))
        return tf.concat([tf.shape(x)[:1], shape[1:]], axis=0)

    def kernel_transpose(self, cotangent, x):
        """``cotangent W^T``: a vector at ``s`` pulled back to the input ``x`` (only its shape matters).

        For Conv2D the transposed convolution: the gradient of ``conv(x, W)``
        in ``x`` with output gradient ``cotangent``.
        """
        kernel = keras.ops.cast(self.kernel, cotangent.dtype)
        if self.is_dense:
            return keras.ops.matmul(cotangent, keras.ops.transpose(kernel))
        x = tf.cast(x, cotangent.dtype)
        with tf.GradientTape() as tape:
            tape.watch(x)
            s = self.layer.convolution_op(x, kernel)
        return tape.gradient(s, x, output_gradients=cotangent)

    def weight_update(self, x, cotangent):
        """The weights' gradient for a given ``dL/ds``: ``[x^T cotangent, sum(cotangent)]``.

        Computed in the variables' dtype. For Dense, by
        :func:`~keras_gradops.training.guessed.kernel_gradient.kernel_gradient`
        (which picks the faster layout under XLA); for Conv2D, the transpose
        of the convolution in its kernel (the filter gradient of ``conv(x, W)``).

        Args:
            x: the layer's input.
            cotangent: a tensor shaped as ``s``.

        Returns:
            A list aligned with ``self.variables``.
        """
        dtype = self.kernel.dtype
        x = tf.cast(x, dtype)
        cotangent = tf.cast(cotangent, dtype)
        if self.is_dense:
            kernel_grad = kernel_gradient(x, cotangent)
            channel_axis = -1
        else:
            kernel = tf.convert_to_tensor(self.kernel)
            with tf.GradientTape() as tape:
                tape.watch(kernel)
                s = self.layer.convolution_op(x, kernel)
            kernel_grad = tape.gradient(s, kernel, output_gradients=cotangent)
            channel_axis = -1 if self.layer.data_format == "channels_last" else 1
        if self.bias is None:
            return [kernel_grad]
        rank = len(cotangent.shape)
        axes = [a for a in range(rank) if a != channel_axis % rank]
        return [kernel_grad, tf.reduce_sum(cotangent, axis=axes)]


def _is_site_layer(layer):
    if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)) or not layer.trainable_weights:
        return False
    own = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
    weights = layer.trainable_weights
    # LoRA and quantized layers hold other weights than kernel and bias.
    return len(own) == len(weights) and all(a is b for a, b in zip(own, weights))


def _draws_random_numbers(layer):
    """Whether ``layer`` or a layer inside it draws random numbers when training (a Dropout of rate 0 does not)."""
    return any(
        isinstance(value, keras.random.SeedGenerator)
        and not (isinstance(sub, keras.layers.Dropout) and sub.rate == 0)
        for sub in all_layers(layer, include_self=True)
        for value in vars(sub).values()
    )


def _recurrent_layer(layer):
    """``layer`` or the first layer inside it that is recurrent, or ``None``."""
    return next((sub for sub in all_layers(layer, include_self=True)
                 if isinstance(sub, (keras.layers.RNN, keras.layers.Bidirectional))), None)


def recompute_problem(layer):
    """Why a second forward pass through ``layer`` (and the layers inside it) would not repeat the first, or ``None``."""
    batch_norm = [sub for sub in all_layers(layer, include_self=True)
                  if isinstance(sub, keras.layers.BatchNormalization)]
    if batch_norm:
        where = "" if batch_norm[0] is layer else f" ({batch_norm[0].name!r} inside it)"
        return f"recompute=True runs the forward pass twice and would update moving statistics{where} twice"
    if _draws_random_numbers(layer):
        return "recompute=True runs the forward pass twice and it draws new random numbers each time"
    return None


def layer_problem(layer, method, recompute=False, whole_model=False):
    """Why ``method`` cannot train ``layer`` (run twice if ``recompute``), or ``None`` if it can.

    ``whole_model``: ``layer`` is a model run by its own call, its linear
    layers guessed where they are (:mod:`~keras_gradops.training.guessed.graph`)
    and every other trainable weight by weight perturbation.
    """
    if method.exact or method.zeroth_order:
        return None
    if whole_model and method.uses_next_layer:
        return f"{method} pulls each guess back through the next Dense/Conv2D kernel, which needs a chain"
    if any(getattr(sub, "activity_regularizer", None) is not None for sub in all_layers(layer, include_self=True)):
        return "an activity_regularizer adds a loss inside a layer call, which a forward-mode guess cannot see"
    if method.perturbs_weights or whole_model:
        recurrent = _recurrent_layer(layer)
        if recurrent is not None:
            where = "" if recurrent is layer else f" ({recurrent.name!r} inside it)"
            return f"forward-mode differentiation of a recurrent layer's loop{where} fails inside tf.function"
        if method.perturbs_weights:
            return None
    problem = recompute_problem(layer) if recompute else None
    if problem is not None or whole_model:
        return problem
    if _is_site_layer(layer) or not layer.trainable_weights or isinstance(layer, NORMALIZATION_LAYERS):
        return None
    return "a layer with trainable weights must be Dense, Conv2D or a normalisation layer"


def _supporting_methods(layer, whole_model=False):
    """The methods that train ``layer``: by a chain's rules (unless ``whole_model``) or, for the methods that
    need no chain, by its model's own call (see ``LayerStack._runs_as_chain``)."""
    return [method for method in m.ALL_METHODS
            if (not whole_model and layer_problem(layer, method) is None)
            or (not method.uses_next_layer and layer_problem(layer, method, whole_model=True) is None)]


def _unsupported(layer, method, reason, methods=None, whole_model=False):
    methods = [method.name for method in (_supporting_methods(layer, whole_model) if methods is None else methods)]
    return ValueError(
        f"Layer {layer.name!r} ({type(layer).__name__}) is not supported by method={method.name!r}: {reason}. "
        f"Methods that support it: {', '.join(methods) if methods else 'none'}."
    )


class NotAChainError(ValueError):
    """A model is not a chain of single-input layers (a method that runs its layers by hand needs one)."""


def _check_built(model):
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built. Build it first, e.g. start a Sequential "
            "with keras.Input(shape) or call model.build(input_shape)."
        )


def stack_layers(model):
    """The layers of a Sequential or single-input, single-output chain functional model, in order.

    A layer that is itself such a model (a nested block) is replaced by its
    own layers, recursively.

    Raises:
        ValueError: ``model`` is not built.
        NotAChainError: ``model`` is not such a chain.
    """
    _check_built(model)
    layers = []
    for layer in _chain(model):
        layers += stack_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return layers


def _chain(model):
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    if not (hasattr(model, "inputs") and hasattr(model, "outputs") and model.inputs is not None):
        raise NotAChainError(
            f"Model {model.name!r} ({type(model).__name__}) is a subclassed model, whose layers cannot be "
            "run one by one"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise NotAChainError(
            f"Model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs, "
            "not one of each"
        )
    layers = []
    tensor = model.outputs[0]
    while tensor is not model.inputs[0]:
        layer, node_index = producing_layer(tensor)
        if not isinstance(layer, keras.layers.Layer):
            raise NotAChainError(
                f"Model {model.name!r} applies {layer.name!r} ({type(layer).__name__}), a Keras operation "
                "that is not a layer"
            )
        inputs = node_inputs(layer, node_index)
        if len(inputs) != 1:
            raise NotAChainError(
                f"Layer {layer.name!r} of model {model.name!r} takes {len(inputs)} inputs, not only the "
                "previous layer's output"
            )
        layers.append(layer)
        tensor = inputs[0]
    return layers[::-1]


class LayerStack:
    """The layers of a model, checked for a method and runnable layer by layer.

    Args:
        model: a built Keras model: a chain (see :func:`stack_layers`) for
            ``weight_transpose`` and ``one_layer_downstream``, any model for
            the others.
        method: a :class:`~keras_gradops.training.guessed.methods.GuessingMethod`.
        recompute: ``True``, ``False`` or ``"auto"``, whether (or where) the
            forward pass may run twice per step (see
            :class:`~keras_gradops.training.guessed.estimator.GradientGuesser`).
        num_guesses: the guesses averaged per step (one forward pass each).

    Attributes:
        layers: the chain's layers in order, or ``[model]`` when the method
            needs no per-layer guess (the model's own call runs its graph).
        is_chain: whether ``layers`` are a chain's layers.
        recompute: ``recompute``, with ``"auto"`` resolved to ``False`` when
            the method keeps no per-layer guesses or a layer cannot run twice
            (it draws random numbers or keeps moving statistics), and, for a
            model run as one layer, to ``True`` otherwise.
        sites: the :class:`Site` of every trainable Dense/Conv2D layer of a
            chain, in order (none for a model run as one layer).
        linear_layers: for a model run as one layer, a
            :class:`~keras_gradops.training.guessed.graph.LinearSite` for each
            of its linear layers (their tangents are computed by hand).
        graph_sites: for an activation-space method on a model run as one
            layer, the :class:`~keras_gradops.training.guessed.graph.LinearSite`
            of every linear layer with trainable weights (none otherwise).
        couples_examples: whether a layer mixes the examples of a batch
            (BatchNormalization), so a per-example directional derivative is
            not one example's.

    Raises:
        ValueError: a layer the method does not support, naming the methods
            that support it; a model that is not a chain for a method that
            needs one, naming the methods that train it.
    """

    def __init__(self, model, method, recompute=False, num_guesses=1):
        _check_built(model)
        self.is_chain = method.guesses_activations and self._runs_as_chain(model, method)
        self.layers = stack_layers(model) if self.is_chain else [model]
        if not model.trainable_weights:
            raise ValueError(f"Model {model.name!r} has no trainable weights: there is no gradient to guess.")
        repeatable = all(recompute_problem(layer) is None for layer in self.layers)
        if recompute == "auto":
            # A chain decides per layer as it runs (GradientGuesser); a whole model rebuilds all or keeps all.
            recompute = repeatable and ("auto" if self.is_chain else True) if method.guesses_activations else False
        self.recompute = recompute
        self.sites = []
        self._site_of = {}
        whole_model = not self.is_chain and method.guesses_activations
        for layer in self.layers:
            problem = layer_problem(layer, method, recompute, whole_model)
            if problem is not None:
                raise _unsupported(layer, method, problem, whole_model=whole_model)
            if self.is_chain and _is_site_layer(layer):
                site = Site(layer, len(self.sites))
                self.sites.append(site)
                self._site_of[id(layer)] = site
        # A model run by its own call: its linear layers, whose tangents a guessed step computes by hand.
        self.linear_layers = [] if self.is_chain else linear_layers(model)
        self.graph_sites = [site for site in self.linear_layers if site.index is not None] if whole_model else []
        batch_norm = [sub for layer in self.layers for sub in all_layers(layer, include_self=True)
                      if isinstance(sub, keras.layers.BatchNormalization)]
        self.couples_examples = bool(batch_norm)
        # (spsa's forward passes run in inference mode: they read the moving statistics, never update them.)
        if batch_norm and num_guesses > 1 and not (method.exact or method.zeroth_order):
            raise ValueError(
                f"num_guesses={num_guesses} runs one forward pass per guess; layer {batch_norm[0].name!r} "
                "(BatchNormalization) would update its moving statistics once per guess. Use num_guesses=1."
            )
        if method.uses_next_layer:
            self._link_sites(method)

    @staticmethod
    def _runs_as_chain(model, method):
        """Whether an activation-space method runs ``model`` layer by layer (else by its own call, see ``graph``).

        A chain whose layers the chain's rules all accept runs as a chain. A
        method that pulls guesses back through the next layer needs one;
        the others run any other model whose layers they support by its own
        call (a chain too, with layers a chain's rules refuse, such as LoRA).

        Raises:
            NotAChainError: a method that needs a chain, on a model that is not one.
        """
        try:
            layers = stack_layers(model)
        except NotAChainError as error:
            if not method.uses_next_layer:
                return False
            whole = [other.name for other in m.ALL_METHODS if layer_problem(model, other, whole_model=True) is None]
            raise NotAChainError(
                f"{error}. method={method.name!r} pulls each guess back through the next Dense/Conv2D kernel, "
                "which needs a chain (a Sequential or a functional model where every layer takes the previous "
                f"layer's output); methods that train this model: {', '.join(whole)}."
            ) from None
        refused = any(layer_problem(layer, method) is not None for layer in layers)
        return method.uses_next_layer or not refused or layer_problem(model, method, whole_model=True) is not None

    def _link_sites(self, method):
        """Checks the layers between consecutive sites and gives each site the reshapes after it."""
        positions = [i for i, layer in enumerate(self.layers) if id(layer) in self._site_of]
        for first, second in zip(positions, positions[1:]):
            between = self.layers[first + 1:second]
            for layer in between:
                if not isinstance(layer, _IDENTITY_IN_GUESS + _RESHAPES):
                    raise _unsupported(
                        layer, method,
                        f"between two Dense/Conv2D layers {method} allows only Flatten, Reshape, Dropout and "
                        "normalisation layers (put activations in the layer's `activation` argument)",
                        [other for other in _supporting_methods(layer) if not other.uses_next_layer],
                    )
            site = self._site_of[id(self.layers[first])]
            site.reshapes = tuple(layer for layer in between if isinstance(layer, _RESHAPES))
            site.exact_next_input = len(site.reshapes) == len(between)

    def next_site(self, site):
        """The site after ``site``, or ``None`` for the last one."""
        return self.sites[site.index + 1] if site.index + 1 < len(self.sites) else None

    def site_of(self, layer):
        """The :class:`Site` of ``layer``, or ``None`` if it is not a site."""
        return self._site_of.get(id(layer))

    def run(self, x, site_fn, training=True, start=0):
        """Runs the stack on ``x`` from layer ``start`` on; each site's output is ``site_fn(site, x_l)``."""
        for layer in self.layers[start:]:
            site = self.site_of(layer)
            x = site_fn(site, x) if site is not None else layer(x, training=training)
        return x
