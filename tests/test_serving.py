"""export_for_serving: TF Serving layout, named signature, standalone reload, saved_model_cli."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradops as kgo
from keras_gradops.serving import export_for_serving


class ScaledRelu(keras.layers.Layer):
    """A custom layer that is registered nowhere: the export must not need it."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return keras.ops.relu(x) * self.scale


def _digits_like_model():
    inputs = keras.Input((8,), name="pixels")
    hidden = ScaledRelu()(keras.layers.Dense(16)(inputs))
    hidden = keras.layers.Dropout(0.5)(hidden)  # must be off in the served function
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden), name="digits_like")


def _two_io_model():
    pixels = keras.Input((3,), name="pixels")
    extra = keras.Input((2,), name="extra")
    hidden = keras.layers.Dense(5, activation="tanh")(keras.layers.Concatenate()([pixels, extra]))
    logits = keras.layers.Dense(4, name="logits")(hidden)
    score = keras.layers.Dense(1, activation="sigmoid", name="score")(hidden)
    return keras.Model([pixels, extra], [logits, score], name="two_io")


@pytest.fixture(scope="module")
def trained():
    """A model trained two steps with a package optimizer, and a two-input, two-output model."""
    rng = np.random.default_rng(0)
    model = _digits_like_model()
    model.compile(optimizer=kgo.SGDGC(learning_rate=0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(rng.normal(size=(32, 8)).astype("float32"), rng.integers(0, 3, 32), batch_size=16, verbose=0)
    two_io = _two_io_model()
    inputs = {
        "x": rng.normal(size=(5, 8)).astype("float32"),
        "pixels": rng.normal(size=(5, 3)).astype("float32"),
        "extra": rng.normal(size=(5, 2)).astype("float32"),
    }
    return model, two_io, inputs


def test_layout_versions_and_names(tmp_path, trained):
    model, two_io, _ = trained
    first = export_for_serving(model, tmp_path)
    second = export_for_serving(model, tmp_path)
    assert first == os.path.join(str(tmp_path), "digits_like", "1")
    assert second == os.path.join(str(tmp_path), "digits_like", "2")
    assert os.path.isfile(os.path.join(second, "saved_model.pb"))
    assert export_for_serving(two_io, tmp_path, name="other", version=7).endswith(os.path.join("other", "7"))
    os.makedirs(tmp_path / "other" / "not_a_version")
    assert export_for_serving(two_io, tmp_path, name="other").endswith(os.path.join("other", "8"))
    assert sorted(os.listdir(tmp_path)) == ["digits_like", "other"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"version": 1}, ValueError, "already exists"),
    ({"version": 0}, ValueError, "positive"),
    ({"version": "3"}, TypeError, "version"),
    ({"version": True}, TypeError, "version"),
    ({"name": "a/b"}, ValueError, "name"),
    ({"name": ""}, ValueError, "name"),
])
def test_bad_arguments(tmp_path, trained, kwargs, error, match):
    model, _, _ = trained
    export_for_serving(model, tmp_path, name="m", version=1)
    with pytest.raises(error, match=match):
        export_for_serving(model, tmp_path, **{"name": "m", **kwargs})
    assert os.listdir(tmp_path / "m") == ["1"]


def test_a_file_where_the_base_directory_belongs(tmp_path, trained):
    model, _, _ = trained
    not_a_directory = tmp_path / "notes.txt"
    not_a_directory.write_text("")
    with pytest.raises(ValueError, match="base_dir.*is a file"):
        export_for_serving(model, not_a_directory, name="m")
    (tmp_path / "m").write_text("")
    with pytest.raises(ValueError, match="base_dir.*is a file"):
        export_for_serving(model, tmp_path, name="m")


class _Subclassed(keras.Model):
    def __init__(self, inner=None):
        super().__init__()
        self.model = inner
        self.dense = keras.layers.Dense(2) if inner is None else None

    def call(self, x):
        return self.dense(x) if self.model is None else self.model(x)


def test_bad_models(tmp_path, trained):
    with pytest.raises(TypeError, match="model"):
        export_for_serving("not a model", tmp_path)
    with pytest.raises(ValueError, match="built"):
        export_for_serving(keras.Sequential([keras.layers.Dense(2)]), tmp_path)
    subclassed = _Subclassed()
    subclassed(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="functional or Sequential"):
        export_for_serving(subclassed, tmp_path)
    # A user's own model holding `.model` is not a package wrapper: not unwrapped.
    users = _Subclassed(trained[0])
    users(np.zeros((1, 8), "float32"))
    with pytest.raises(ValueError, match="functional or Sequential"):
        export_for_serving(users, tmp_path)
    inputs = keras.Input((2,), name="bad name")
    with pytest.raises(ValueError, match="bad name"):
        export_for_serving(keras.Model(inputs, keras.layers.Dense(1)(inputs)), tmp_path)
    assert os.listdir(tmp_path) == []


def test_guessed_gradient_model_exports_its_network(tmp_path):
    inputs = keras.Input((6,), name="features")
    net = keras.Model(inputs, keras.layers.Dense(3, name="logits")(keras.layers.Dense(4, activation="relu")(inputs)),
                      name="guessed_net")
    model = kgo.GuessedGradientModel(net, method="weight_transpose", seed=0)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(1).normal(size=(8, 6)).astype("float32")
    model.fit(x, np.arange(8) % 3, verbose=0)
    path = export_for_serving(model, tmp_path)
    assert path == os.path.join(str(tmp_path), "guessed_net", "1")
    served = tf.saved_model.load(path).signatures["serving_default"]
    np.testing.assert_allclose(served(features=tf.constant(x))["logits"], net.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


_FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    report = {}
    for key, (path, npz) in json.loads(sys.argv[1]).items():
        fn = tf.saved_model.load(path).signatures["serving_default"]
        inputs = np.load(npz)
        kwargs = {name: tf.constant(inputs[name]) for name in fn.structured_input_signature[1]}
        report[key] = {
            "inputs": sorted(fn.structured_input_signature[1]),
            "outputs": {name: value.numpy().tolist() for name, value in fn(**kwargs).items()},
        }
    # TensorFlow imports Keras itself; neither this package nor the test's custom layer is loaded.
    report["loaded_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("keras_gradops", "test_serving"))
    print(json.dumps(report))
""")


def _predict(model, x):
    outputs = model.predict(x, verbose=0)
    return outputs if isinstance(outputs, list) else [outputs]


def test_fresh_tensorflow_process_and_saved_model_cli(tmp_path, trained):
    model, two_io, inputs = trained
    digits_path = export_for_serving(model, tmp_path / "models")
    # A package wrapper exports the network it trains.
    two_io_path = export_for_serving(kgo.GradientOpsModel(two_io, global_clipnorm=1.0), tmp_path / "models")
    assert two_io_path.endswith(os.path.join("two_io", "1"))
    np.savez(tmp_path / "digits.npz", pixels=inputs["x"])
    np.savez(tmp_path / "two_io.npz", pixels=inputs["pixels"], extra=inputs["extra"])
    jobs = {"digits_like": (digits_path, str(tmp_path / "digits.npz")),
            "two_io": (two_io_path, str(tmp_path / "two_io.npz"))}

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, json.dumps(jobs)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, check=True, timeout=120)
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["loaded_modules"] == []
    assert fresh["digits_like"]["inputs"] == ["pixels"]
    assert fresh["two_io"]["inputs"] == ["extra", "pixels"]
    assert sorted(fresh["two_io"]["outputs"]) == ["logits", "score"]

    expected_digits = _predict(model, inputs["x"])[0]
    expected_logits, expected_score = _predict(two_io, [inputs["pixels"], inputs["extra"]])
    tolerance = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(fresh["digits_like"]["outputs"]["logits"], expected_digits, **tolerance)
    np.testing.assert_allclose(fresh["two_io"]["outputs"]["logits"], expected_logits, **tolerance)
    np.testing.assert_allclose(fresh["two_io"]["outputs"]["score"], expected_score, **tolerance)

    np.save(tmp_path / "pixels.npy", inputs["pixels"])
    np.save(tmp_path / "extra.npy", inputs["extra"])
    subprocess.run(
        ["saved_model_cli", "run", "--dir", two_io_path, "--tag_set", "serve",
         "--signature_def", "serving_default", "--outdir", str(tmp_path / "cli"),
         "--inputs", f"pixels={tmp_path / 'pixels.npy'};extra={tmp_path / 'extra.npy'}"],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    )
    np.testing.assert_allclose(np.load(tmp_path / "cli" / "logits.npy"), expected_logits, **tolerance)
    np.testing.assert_allclose(np.load(tmp_path / "cli" / "score.npy"), expected_score, **tolerance)
