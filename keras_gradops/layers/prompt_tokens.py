"""Prompt tuning: trainable tokens inserted into a sequence of token or patch embeddings."""

import keras


@keras.saving.register_keras_serializable(package="keras_gradops")
class PromptTokens(keras.layers.Layer):
    """Inserts ``num_tokens`` trainable embeddings into every sequence of a batch.

    For embeddings ``x`` of shape ``(batch, length, dim)`` the output is
    ``concat(x[:, :index], P, x[:, index:])`` along the sequence axis, of
    shape ``(batch, length + num_tokens, dim)``, with ``P`` a trainable
    ``(num_tokens, dim)`` weight shared by every example: prompt tuning (Lester
    et al. 2021, arXiv 2104.08691) and, on patch embeddings, visual prompt
    tuning (VPT-shallow: Jia et al. 2022, arXiv 2203.12119, which keeps the
    class token first, ``index=1``). Freeze the pretrained model and train
    only ``P`` (and a head); "How to guess a gradient" (Singhal et al., arXiv
    2312.04709) prompt-tunes a ViT-B/16 with guessed gradients.

    Args:
        num_tokens: ``N``, the number of prompt tokens (an int >= 1).
        index: where they go in the sequence (an int >= 0): ``0`` before
            every token, ``1`` after a class token.
        initializer: the initializer of ``P`` (default ``RandomNormal`` with
            standard deviation 0.02, as ViT's embeddings).
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    Raises:
        ValueError: ``num_tokens`` or ``index`` is not a non-negative int
            (``num_tokens`` positive); at build, an input that is not
            ``(batch, length, dim)`` or shorter than ``index``.

    Example (a keras_hub ViT, prompts after the class token; ``backbone``
    built, its layers frozen)::

        images = keras.Input((224, 224, 3))
        tokens = backbone.get_layer("vit_patching_and_embedding")(images)
        tokens = kgo.layers.PromptTokens(16, index=1)(tokens)
        features = backbone.get_layer("vit_encoder")(tokens)
        logits = keras.layers.Dense(num_classes)(features[:, 0])
        model = keras.Model(images, logits)
    """

    def __init__(self, num_tokens, index=0, initializer=None, **kwargs):
        super().__init__(**kwargs)
        for name, value, least in (("num_tokens", num_tokens, 1), ("index", index, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an int >= {least}. Received: {name}={value!r}")
        self.num_tokens = num_tokens
        self.index = index
        self.initializer = keras.initializers.get(
            initializer if initializer is not None else keras.initializers.RandomNormal(stddev=0.02))

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                f"Layer {self.name!r} takes embeddings of shape (batch, length, dim) with a known dim. "
                f"Received: input_shape={input_shape}"
            )
        if input_shape[1] is not None and input_shape[1] < self.index:
            raise ValueError(
                f"Layer {self.name!r} inserts its tokens at index={self.index}, past the sequence's "
                f"length {input_shape[1]}."
            )
        self.prompts = self.add_weight(
            shape=(self.num_tokens, input_shape[-1]), initializer=self.initializer, name="prompts")

    def call(self, inputs):
        batch = keras.ops.shape(inputs)[0]
        prompts = keras.ops.cast(self.prompts, inputs.dtype)
        prompts = keras.ops.broadcast_to(prompts[None], (batch, self.num_tokens, prompts.shape[-1]))
        return keras.ops.concatenate([inputs[:, :self.index], prompts, inputs[:, self.index:]], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + self.num_tokens
        return (input_shape[0], length, input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(num_tokens=self.num_tokens, index=self.index,
                      initializer=keras.initializers.serialize(self.initializer))
        return config
