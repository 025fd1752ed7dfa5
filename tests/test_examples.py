"""The examples' data helpers, and a --quick smoke run of every example, in-process, offline.

Each smoke run checks a property of its outputs that an independent
computation confirms (a reloaded export's accuracy, a gradient norm from a
tape, a projection's effect on a norm), not only that it ran.
"""

import http.server
import json
import os
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_gradops import data

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import exploding_gradients  # noqa: E402
import fine_tuning_vit_cifar10  # noqa: E402
import gradient_centralization_cifar10  # noqa: E402
import guessing_gradients_cifar10  # noqa: E402
import quickstart  # noqa: E402
import serving_request  # noqa: E402

pytestmark = pytest.mark.examples_extra

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as file:
        return file.read(8) == PNG_SIGNATURE


# --- keras_gradops.data ------------------------------------------------------------------------


def _tiny_images(count, offset):
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8), rng.integers(0, 3, count)


class KerasGradopsTestImages(tfds.core.GeneratorBasedBuilder):
    """A 4x4 image dataset generated in-process: `load_tfds` prepares it without network."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(4, 4, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(*_tiny_images(6, 0)),
                "test": self._generate_examples(*_tiny_images(2, 1))}

    def _generate_examples(self, images, labels):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image, "label": label}


class KerasGradopsOfflineImages(KerasGradopsTestImages):
    """Its download fails as it does without network."""

    def _split_generators(self, dl_manager):
        raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")


def _sorted_by_label_and_pixels(images, labels):
    order = np.lexsort((images.reshape(len(images), -1).sum(axis=1), labels))
    return images[order], labels[order]


def test_load_tfds_prepares_and_loads_a_local_dataset(tmp_path):
    (train_x, train_y), (test_x, test_y) = data.load_tfds("keras_gradops_test_images", data_dir=str(tmp_path))
    for (x, y), expected in (((train_x, train_y), _tiny_images(6, 0)), ((test_x, test_y), _tiny_images(2, 1))):
        assert x.dtype == np.uint8 and x.shape[1:] == (4, 4, 3)
        got, want = _sorted_by_label_and_pixels(x, y), _sorted_by_label_and_pixels(*expected)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    # Prepared now: loads again with download disabled.
    (again_x, _), = data.load_tfds("keras_gradops_test_images", data_dir=str(tmp_path), splits=("train",),
                                   download=False)
    assert again_x.shape == train_x.shape


def test_load_tfds_says_how_to_provide_a_dataset(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match="--data-dir") as error:
        data.load_tfds("keras_gradops_offline_images", data_dir=str(tmp_path))
    assert "ConnectionError" in str(error.value) and "download_and_prepare" in str(error.value)
    assert isinstance(error.value.__cause__, ConnectionError)
    with pytest.raises(data.DatasetUnavailableError, match="download=False"):
        data.load_tfds("keras_gradops_test_images", data_dir=str(tmp_path), download=False)


def test_load_digits_is_a_stratified_partition_of_sklearn_digits():
    from sklearn.datasets import load_digits

    (x_train, y_train), (x_test, y_test) = data.load_digits(test_fraction=0.25, seed=3)
    reference = load_digits()
    assert x_train.dtype == np.float32 and x_train.shape[1] == 64
    assert len(x_train) + len(x_test) == len(reference.data) and len(x_test) == 450
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    rows = {tuple(row) for row in np.round(np.concatenate([x_train, x_test]) * 16).astype(int)}
    assert rows == {tuple(row) for row in reference.data.astype(int)}
    train_share = np.bincount(y_train, minlength=10) / len(y_train)
    test_share = np.bincount(y_test, minlength=10) / len(y_test)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)


def test_standardize_uses_the_train_split_statistics():
    # The guessing example and benchmark standardize per feature with the TRAIN split's mean and std (a
    # constant feature keeps std 1): on pixels in [0, 1] activation mixing kills the first layer's ReLUs.
    x_train, x_test = data.standardize(np.array([[0.0, 2.0, 5.0], [2.0, 2.0, 7.0]]), np.array([[3.0, 2.0, 6.0]]))
    np.testing.assert_allclose(x_train, [[-1.0, 0.0, -1.0], [1.0, 0.0, 1.0]])
    np.testing.assert_allclose(x_test, [[2.0, 0.0, 0.0]])


def test_synthetic_images_are_seeded_and_learnable():
    (x_train, y_train), (x_test, y_test) = data.synthetic_images(400, 200, shape=(8, 8, 3), num_classes=5, seed=1)
    (x_again, y_again), _ = data.synthetic_images(400, 200, shape=(8, 8, 3), num_classes=5, seed=1)
    np.testing.assert_array_equal(x_train, x_again)
    np.testing.assert_array_equal(y_train, y_again)
    assert x_train.dtype == np.uint8 and x_train.shape == (400, 8, 8, 3) and set(y_test) == set(range(5))
    # Nearest class mean (fit on train) classifies the test split far above chance (0.2).
    means = np.stack([x_train[y_train == c].reshape(-1, 192).mean(axis=0) for c in range(5)])
    distances = ((x_test.reshape(-1, 1, 192) - means[None]) ** 2).sum(axis=2)
    assert np.mean(np.argmin(distances, axis=1) == y_test) > 0.9


def test_format_table_is_markdown():
    import example_utils

    table = example_utils.format_table(["name", "value"], [["a", 0.5], ["bb", 1]])
    assert table.splitlines() == ["| name | value  |", "|------|--------|", "| a    | 0.5000 |", "| bb   | 1      |"]


# --- serving_request ---------------------------------------------------------------------------


def test_predict_request_and_response_row_format():
    one = serving_request.predict_request({"pixels": np.array([[1.0, 2.0], [3.0, 4.0]])})
    assert one == {"instances": [[1.0, 2.0], [3.0, 4.0]]}
    two = serving_request.predict_request({"a": np.array([[1.0], [2.0]]), "b": np.array([5, 6])})
    assert two == {"instances": [{"a": [1.0], "b": 5}, {"a": [2.0], "b": 6}]}
    with pytest.raises(ValueError, match="batch size"):
        serving_request.predict_request({"a": np.zeros((2, 1)), "b": np.zeros(3)})
    response = serving_request.expected_response({"logits": np.array([[0.5, 1.5]]), "score": np.array([[0.25]])})
    assert response == {"predictions": [{"logits": [0.5, 1.5], "score": [0.25]}]}


@pytest.mark.parametrize("response, match", [
    ({"outputs": [[0.1, 0.9]]}, "predictions"),  # the columnar format, not the row one
    ({"predictions": [[0.1, 0.9], [0.5, 0.5]]}, "Expected 1 predictions"),
    ({"predictions": [{"probabilities": [0.1, 0.9]}]}, "structure"),
    ({"predictions": [[0.1, 0.8]]}, "differs"),
    ({"predictions": [[0.1, 0.9, 0.0]]}, "differs"),
])
def test_check_response_rejects(response, match):
    with pytest.raises(ValueError, match=match):
        serving_request.check_response(response, {"predictions": [[0.1, 0.9]]})


class _FakeServing(http.server.BaseHTTPRequestHandler):
    """Answers POST /v1/models/<name>:predict with the canned `answer`, records the request."""

    answer, received = None, []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeServing.received.append((self.path, body))
        payload = json.dumps(_FakeServing.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


# --- example smoke runs (--quick) --------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("quickstart")
    outcome = quickstart.main(["--quick", "--out-dir", str(base / "runs"), "--export-dir", str(base / "saved_models"),
                               "--verbose", "0"])
    return base, outcome


def test_quickstart_exports_its_better_model(quickstart_run):
    base, outcome = quickstart_run
    results = outcome["results"]
    assert list(results) == ["keras SGD", "keras_gradops SGDGC"]
    assert outcome["best"] == max(results, key=lambda name: results[name]["test_accuracy"])
    assert outcome["export_path"] == os.path.join(str(base / "saved_models"), "digits_mlp", "1")
    assert _is_png(outcome["figure"])
    # The exported SavedModel, reloaded, scores the reported test accuracy on the same split.
    _, (x_test, y_test) = data.load_digits(seed=0)
    served = tf.saved_model.load(outcome["export_path"]).signatures["serving_default"]
    probabilities = served(pixels=tf.constant(x_test))["probabilities"].numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = np.mean(np.argmax(probabilities, axis=1) == y_test)
    assert accuracy == pytest.approx(results[outcome["best"]]["test_accuracy"], abs=1e-6)
    assert accuracy > 0.5  # 10 classes: chance is 0.1


def test_serving_request_against_a_server(quickstart_run, tmp_path):
    _, outcome = quickstart_run
    x = np.random.default_rng(0).uniform(size=(3, 64)).astype("float32")
    np.savez(tmp_path / "inputs.npz", pixels=x)
    model = tf.saved_model.load(outcome["export_path"]).signatures["serving_default"]
    expected_rows = model(pixels=tf.constant(x))["probabilities"].numpy().tolist()

    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeServing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    args = [outcome["export_path"], "--inputs", str(tmp_path / "inputs.npz"), "--server", url,
            "--out-dir", str(tmp_path)]
    try:
        _FakeServing.answer = {"predictions": expected_rows}
        body, _ = serving_request.main(args)
        path, received = _FakeServing.received[-1]
        assert path == "/v1/models/digits_mlp:predict"
        assert received == body == {"instances": x.tolist()}
        with open(tmp_path / "request.json") as file:
            assert json.load(file) == body
        _FakeServing.answer = {"outputs": expected_rows}  # the columnar answer: wrong for a row request
        with pytest.raises(ValueError, match="predictions"):
            serving_request.main(args)
    finally:
        server.shutdown()
        server.server_close()


def test_adding_problem_targets():
    x, y = exploding_gradients.adding_problem(50, 20, np.random.default_rng(0))
    markers = x[:, :, 1]
    np.testing.assert_array_equal(markers.sum(axis=1), 2.0)
    np.testing.assert_array_equal(markers[:, :10].sum(axis=1), 1.0)
    np.testing.assert_allclose(y[:, 0], [x[i, markers[i] == 1, 0].sum() for i in range(50)], rtol=1e-6)


def test_exploding_gradients_logs_the_pre_clip_norm_and_each_rules_threshold(tmp_path):
    # One batch holds the whole training set: the first step's gradient is known independently.
    outcome = exploding_gradients.main(["--quick", "--num-train", "64", "--batch-size", "64", "--epochs", "6",
                                        "--sequence-length", "30", "--units", "8", "--eval-every", "1",
                                        "--out-dir", str(tmp_path), "--verbose", "0"])
    assert all(len(seeds) == 1 for seeds in outcome["runs"].values())
    logs = {name: seeds[0][0] for name, seeds in outcome["runs"].items()}
    assert list(logs) == ["no clipping", "value 0.1", "global norm 0.1", "global norm 1", "global norm 10",
                          "AutoClip()", "ZClip()", "ZClip(max_norm=None)"]
    assert all(_is_png(path) for path in outcome["figures"])

    rng = np.random.default_rng(0)
    x, y = exploding_gradients.adding_problem(64, 30, rng)
    keras.utils.set_random_seed(0)
    model = exploding_gradients.build_model("lstm", 30, 8)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    gradients = tape.gradient(loss, [v.value for v in model.trainable_variables])
    first_norm = np.sqrt(sum(np.sum(np.square(g.numpy())) for g in gradients))
    for log in logs.values():
        assert len(log.norms) == 6 and log.eval_steps == [1, 2, 3, 4, 5, 6]
        assert log.norms[0] == pytest.approx(first_norm, rel=1e-4)
    # From step 2 on, the clipped runs have taken different steps from the unclipped one.
    assert logs["no clipping"].norms[1] != logs["global norm 0.1"].norms[1]
    assert np.isnan(logs["value 0.1"].thresholds).all()
    np.testing.assert_allclose(logs["global norm 0.1"].thresholds, 0.1, rtol=1e-6)
    # AutoClip's default: the 10th percentile (NumPy's linear rule) of the norms seen so far.
    norms = logs["AutoClip()"].norms
    expected = [np.quantile(norms[: t + 1], 0.1) for t in range(len(norms))]
    np.testing.assert_allclose(logs["AutoClip()"].thresholds, expected, rtol=1e-5)
    # ZClip's default warms up for 25 steps, clipping at its cap of 1.0 meanwhile.
    np.testing.assert_allclose(logs["ZClip()"].thresholds, 1.0)


def test_gradient_centralization_cifar10_quick(tmp_path):
    outcome = gradient_centralization_cifar10.main(["--quick", "--out-dir", str(tmp_path), "--verbose", "0",
                                                    "--probe-size", "32"])
    runs = outcome["runs"]
    assert list(runs) == ["SGD", "SGDGC", "Adam", "AdamGC"]
    assert all(len(seeds) == 2 and seeds[1]["probe"] is None for seeds in runs.values())
    # Each run's reported test accuracy: its final weights, predicting here, argmax against the labels.
    x_test, y_test = outcome["test_data"]
    net = gradient_centralization_cifar10.build_resnet(4)  # --quick width
    for seeds in runs.values():
        for run in seeds:
            net.set_weights(run["weights"])
            predicted = np.argmax(net.predict(x_test, batch_size=500, verbose=0), axis=1)
            assert np.mean(predicted == y_test) == pytest.approx(run["test_accuracy"], abs=1e-6)
    assert all(_is_png(path) for path in outcome["figures"])
    # Step 0: every run starts from the same weights on the same probe batch, so the raw gradients
    # agree, and centralization -- a projection -- makes the GC runs' gradients strictly shorter.
    probes = {name: seeds[0]["probe"] for name, seeds in runs.items()}
    for layer in gradient_centralization_cifar10.PROBED_LAYERS:
        step0 = {name: probe.l2[layer][0] for name, probe in probes.items()}
        assert all(probe.steps[0] == 0 for probe in probes.values())
        assert step0["SGD"] == pytest.approx(step0["Adam"], rel=1e-5)
        assert step0["SGDGC"] == pytest.approx(step0["AdamGC"], rel=1e-5)
        assert step0["SGDGC"] < 0.999 * step0["SGD"]


def test_guessing_gradients_cifar10_quick(tmp_path):
    outcome = guessing_gradients_cifar10.main([
        "--quick", "--out-dir", str(tmp_path), "--verbose", "0",
        "--methods", "directional_descent", "weight_transpose", "backprop", "keras backprop"])
    results = outcome["results"]
    assert _is_png(outcome["figure"])
    # The model's "backprop" oracle trains exactly as Keras' own backprop from the same weights and batches.
    np.testing.assert_allclose(results["backprop"]["history"]["loss"], results["keras backprop"]["history"]["loss"],
                               rtol=1e-4)
    assert results["backprop"]["cosine"][-1] == pytest.approx(1.0, abs=1e-4)
    # Directional descent's cosine is O(1/sqrt(N)) for N ~ 4e5 weights; W^T guesses in the
    # activations' span and aligns far better (Singhal et al.).
    assert abs(results["directional_descent"]["cosine"][-1]) < 0.02
    assert results["weight_transpose"]["cosine"][-1] > 0.1


def test_multi_worker_two_processes_end_with_the_same_weights(tmp_path):
    import hashlib

    import multi_worker

    result_dir = tmp_path / "results"
    status = multi_worker.main(["--workers", "2", "--quick", "--out-dir", str(tmp_path / "runs"),
                                "--result-dir", str(result_dir), "--timeout", "300"])
    assert status == 0
    weights = []
    for task in range(2):
        with np.load(result_dir / f"worker{task}.weights.npz") as saved:
            weights.append([saved[f"arr_{i}"] for i in range(len(saved.files))])
        reported = json.loads((result_dir / f"worker{task}.json").read_text())
        digest = hashlib.sha256(b"".join(w.tobytes() for w in weights[task])).hexdigest()
        assert reported["weights sha256"] == digest[:16]
        # The saved weights, in a fresh network here, score the reported test accuracy.
        _, (x_test, y_test) = data.load_digits(seed=0)
        keep = len(x_test) - len(x_test) % 64  # the example evaluates whole global batches
        net = multi_worker.build_net(64, seed=0)
        net.set_weights(weights[task])
        accuracy = np.mean(np.argmax(net.predict(x_test[:keep], verbose=0), axis=1) == y_test[:keep])
        assert accuracy == pytest.approx(reported["test accuracy"], abs=1e-6)
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_fine_tuning_vit_cifar10_quick(tmp_path):
    # Without XLA, three of the five methods: each short run's time is mostly tracing (every method's step, under
    # XLA too, is tested in test_guessed_graphs and test_guessed_keras_hub).
    outcome = fine_tuning_vit_cifar10.main(["--quick", "--no-jit-compile", "--out-dir", str(tmp_path), "--verbose",
                                            "0", "--methods", "backprop", "directional_descent", "weight_transpose"])
    args, results, pretrained = outcome["args"], outcome["results"], outcome["pretrained_weights"]
    assert list(results) == ["lora", "prompts"] and 0.0 <= outcome["pretrain_accuracy"] <= 1.0
    # Trainable parameters counted by hand: only LoRA's factors on each block's query and value (Keras'
    # EinsumDense: A is (hidden, heads, rank), B (rank, head_dim); the kernels and biases frozen) or the
    # prompt tokens, plus the new Dense(5) head.
    hidden, rank = args.hidden_dim, args.lora_rank
    head = hidden * 5 + 5
    expected = {"lora": args.num_layers * 2 * rank * (hidden * args.num_heads + hidden // args.num_heads) + head,
                "prompts": args.prompts * hidden + head}
    for peft, methods in results.items():
        assert list(methods) == ["backprop", "directional_descent", "weight_transpose"]
        for method, result in methods.items():
            if method == "weight_transpose" and result["unsupported"]:
                # W^T pulls guesses back through the next kernel: a graph (ViT under a head) is refused.
                assert result["unsupported"].startswith("not supported on this model: ")
                assert "needs a chain" in result["error"] and result["test_accuracy"] == []
                continue
            assert result["unsupported"] is None and result["steps"] == args.steps
            assert result["trainable_params"] == expected[peft]
            assert len(result["test_accuracy"]) == len(result["cosine"]) == len(outcome["seeds"])
            assert all(0.0 <= a <= 1.0 for a in result["test_accuracy"])
            # Every pretrained backbone weight (LoRA's base kernels, the frozen ViT) is bit-for-bit unchanged.
            for after in result["backbone_after"]:
                assert len(after) == len(pretrained)
                assert all(np.array_equal(a, b) for a, b in zip(pretrained, after))
        # The oracle's guess is the true gradient.
        assert methods["backprop"]["cosine"][0] == pytest.approx(1.0, abs=1e-4)
        # Directional descent guesses (g . v) v, v = +-1 in R^N: cos(guess, g) = |g . v| / (|g| sqrt(N)), never
        # negative, and g . v / |g| is sub-Gaussian with variance 1 (Hoeffding: P(> 5) < 2 exp(-12.5) ~ 7e-6
        # per step), so the mean over steps is < 5 / sqrt(N) barring a ~1e-5 event (measured ~0.8 / sqrt(N)).
        n = expected[peft]
        assert 0.0 < methods["directional_descent"]["cosine"][0] < 5 / np.sqrt(n)
