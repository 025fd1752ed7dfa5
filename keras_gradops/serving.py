"""Export a trained Keras model in the directory layout TensorFlow Serving reads.

TF Serving watches ``<base_dir>/<name>/`` and serves the highest integer
version directory in it, each one a SavedModel whose ``serving_default``
signature is what ``POST /v1/models/<name>:predict`` runs.
:func:`export_for_serving` writes that layout with named signature inputs (the
model's ``Input`` names) and named outputs (its output layers' names).

The SavedModel holds the forward pass only: it loads with
``tf.saved_model.load`` in a process that imports nothing but TensorFlow, and
needs neither ``keras_gradops`` nor the model's custom objects. To serve it::

    docker run -p 8501:8501 \\
        -v "$PWD/saved_models/digits_mlp:/models/digits_mlp" \\
        -e MODEL_NAME=digits_mlp tensorflow/serving
    # or, with the binary: tensorflow_model_server --rest_api_port=8501 \\
    #     --model_name=digits_mlp --model_base_path="$PWD/saved_models/digits_mlp"
    curl -X POST http://localhost:8501/v1/models/digits_mlp:predict \\
        -d '{"instances": [[0.0, 0.3, ...], ...]}'

The response is ``{"predictions": [...]}``: one entry per instance, a list
for a one-output model and ``{output_name: value}`` for several outputs. A
model with several inputs takes ``{"instances": [{input_name: value}, ...]}``.
"""

import os
import re

import keras
import tensorflow as tf

# TF Serving model names and TF op (placeholder) names share this alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def export_for_serving(model, base_dir, name=None, version=None):
    """Writes ``model`` as SavedModel ``base_dir/<name>/<version>/`` for TF Serving.

    ``serving_default(**{input_name: batch}) -> {output_name: batch}``, run
    with ``training=False``. A wrapper of this package that holds the trained
    network as ``.model`` (``GuessedGradientModel``, ``GradientOpsModel``)
    exports that inner network.

    Args:
        model: a built functional or ``Sequential`` ``keras.Model``, or a
            ``keras_gradops`` wrapper exposing one as ``.model``.
        base_dir: directory holding one sub-directory per served model
            (TF Serving's ``--model_config_file`` base paths), e.g.
            ``"saved_models"``. Created if missing.
        name: the model name TF Serving serves it under (letters, digits,
            ``_``, ``.``, ``-``). Defaults to the model's ``name``.
        version: positive int, the version directory. Defaults to one more
            than the highest existing version (1 for the first export). An
            existing version is never overwritten.

    Returns:
        The path of the version directory (``str``).

    Raises:
        TypeError: ``model`` is not a Keras model, or ``version`` not an int.
        ValueError: an unbuilt or subclassed model, an invalid ``name`` or
            signature name, a non-positive ``version``, or one that exists,
            or a file where a directory belongs.

    Example:
        >>> import tempfile
        >>> inputs = keras.Input((4,), name="features")
        >>> net = keras.Model(inputs, keras.layers.Dense(2, name="logits")(inputs), name="toy")
        >>> base_dir = tempfile.mkdtemp()
        >>> os.path.relpath(export_for_serving(net, base_dir), base_dir)
        'toy/1'
    """
    model = _served_model(model)
    name = model.name if name is None else name
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            "`name` must be a TF Serving model name: letters, digits, '_', '.', '-', "
            f"starting with a letter or digit. Received: name={name!r}"
        )
    for directory in (os.fspath(base_dir), os.path.join(os.fspath(base_dir), name)):
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(
                f"`base_dir` must be a directory (made if missing) that holds one directory per model; "
                f"{directory!r} is a file. Received: base_dir={base_dir!r}"
            )
    model_dir = os.path.join(os.fspath(base_dir), name)
    version = _next_version(model_dir) if version is None else _checked_version(version, model_dir)
    path = os.path.join(model_dir, str(version))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", _serving_function(model), input_signature=_input_specs(model))
    archive.write_out(path, verbose=False)
    return path


def _served_model(model):
    """The network to export: unwraps ``keras_gradops`` wrappers holding ``.model``."""
    while _is_package_wrapper(model):
        model = model.model
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: model={model!r}")
    if not model.built:
        raise ValueError("`model` must be built (trained or called once) before it is exported.")
    if not getattr(model, "inputs", None):
        raise ValueError(
            f"`model` ({type(model).__name__}) must be a functional or Sequential model with "
            "`keras.Input`s, so the serving signature knows its input names and shapes. "
            "Wrap a subclassed model: `keras.Model(inputs, subclassed(inputs))`."
        )
    return model


def _is_package_wrapper(model):
    in_package = any(cls.__module__.split(".")[0] == "keras_gradops" for cls in type(model).__mro__)
    return in_package and isinstance(getattr(model, "model", None), keras.Model)


def _input_specs(model):
    specs = []
    for tensor in model.inputs:
        _check_signature_name(tensor.name, "input")
        shape = (None,) + tuple(tensor.shape[1:])
        specs.append(tf.TensorSpec(shape, tensor.dtype, name=tensor.name))
    return specs


def _serving_function(model):
    input_names = [tensor.name for tensor in model.inputs]
    output_names = list(getattr(model, "output_names", None) or [model.layers[-1].name])
    for output_name in output_names:
        _check_signature_name(output_name, "output")
    if len(set(output_names)) != len(output_names):
        raise ValueError(f"`model` output names must be unique to name the signature. Received: {output_names}")

    def serve(*inputs):
        if len(inputs) == 1:
            outputs = model(inputs[0], training=False)
        else:
            outputs = model(dict(zip(input_names, inputs)), training=False)
        if isinstance(outputs, dict):
            return dict(outputs)
        return dict(zip(output_names, keras.tree.flatten(outputs)))

    return serve


def _check_signature_name(name, kind):
    if not _NAME.match(name):
        raise ValueError(
            f"The model's {kind} name {name!r} cannot name a serving signature {kind}: "
            f"name the {'keras.Input' if kind == 'input' else 'output layer'} with letters, "
            "digits, '_', '.', '-'."
        )


def _next_version(model_dir):
    versions = [int(entry) for entry in _entries(model_dir) if entry.isdigit()]
    return max(versions, default=0) + 1


def _checked_version(version, model_dir):
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"`version` must be an int. Received: version={version!r}")
    if version < 1:
        raise ValueError(f"`version` must be a positive int. Received: version={version}")
    if str(version) in _entries(model_dir):
        raise ValueError(
            f"`version` {version} already exists in {model_dir!r}: pass a new version, "
            "or omit it to use the next free one."
        )
    return version


def _entries(directory):
    return os.listdir(directory) if os.path.isdir(directory) else []
