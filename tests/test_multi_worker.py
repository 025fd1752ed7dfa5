"""MultiWorkerMirroredStrategy with real worker processes on localhost.

Each launch starts two TensorFlow processes (``tests/multi_worker_scenarios.py``)
with their own ``TF_CONFIG`` on free ports, under a timeout, and kills what
is left at the end. What the workers saw is checked here against hand-worked
values, NumPy, ``tf.GradientTape`` with a plain Keras optimizer, and a
rebuild of the guessed gradient from its seed.
"""

import json
import os
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradops as kgo
from keras_gradops.cluster import LocalCluster
from keras_gradops.training.guessed.noise import fold_in

SCENARIOS = os.path.join(os.path.dirname(__file__), "multi_worker_scenarios.py")
WORKERS = 2
TIMEOUT = 240


def launch(output_dir, names, options=None, on_start=None):
    """Runs the scenarios on two workers; returns ``(results, cluster)`` once every worker has exited."""
    env = {"SCENARIO_OPTIONS": json.dumps(options or {}), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with LocalCluster([sys.executable, SCENARIOS, str(output_dir), *names], WORKERS, env=env) as cluster:
        if on_start is not None:
            on_start(cluster)
        results = cluster.wait(timeout=TIMEOUT)
    return results, cluster


def read(output_dir, name):
    return [json.load(open(os.path.join(output_dir, f"{name}.{task}.json"))) for task in range(WORKERS)]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("multi_worker")
    results, _ = launch(output_dir, ["global_clip", "custom_loop", "nan_skip", "mixed_precision", "guessed",
                                     "all_reduces", "resumable"])
    for result in results:
        assert result.returncode == 0, f"worker {result.index} failed:\n{result.output[-4000:]}"
    return output_dir


def small_mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu", name="hidden"),
                             keras.layers.Dense(3, name="out")])


def numpy_weight_transpose_guess(weights, x, y, draws):
    """``small_mlp``'s weight-transpose guess under mean squared error, rebuilt in NumPy from its draws.

    ``y_hidden = (eps W_out^T) * 1[s_1 > 0]``, ``y_out`` the draw at the last
    layer; ``d_b = sum_l <dL/ds_l, y_l>_b``; each layer's update
    ``x_l^T (d * y_l)`` and its bias's ``sum_b d_b y_l``.
    """
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    s1 = x @ w1 + b1
    a1 = np.maximum(s1, 0)
    s2 = a1 @ w2 + b2
    g2 = 2 * (s2 - y) / s2.size
    g1 = (g2 @ w2.T) * (s1 > 0)
    y1 = (draws["hidden"].numpy() @ w2.T) * (s1 > 0)
    y2 = draws["out"].numpy().astype(np.float64)
    d = np.sum(g1 * y1, axis=1) + np.sum(g2 * y2, axis=1)
    return [x.T @ (d[:, None] * y1), np.sum(d[:, None] * y1, axis=0),
            a1.T @ (d[:, None] * y2), np.sum(d[:, None] * y2, axis=0)]


def test_the_aggregated_gradient_is_clipped_and_logged(scenarios):
    """Replicas see x = [6, 0] and [0, 8]; each gradient is x / 2, the sum [3, 4] has norm 5, clipped to 1."""
    for worker in read(scenarios, "global_clip"):
        np.testing.assert_allclose(worker["kernel"], [-0.6, -0.8], rtol=1e-6)
        np.testing.assert_allclose(worker["history"]["grad_norm"], [5.0], rtol=1e-6)
        assert worker["history"]["clipped_fraction"] == [1.0]
        # evaluate: mean of x . w over both workers' examples = (6 * -0.6 + 8 * -0.8) / 2
        np.testing.assert_allclose(worker["evaluate"], -5.0, rtol=1e-6)
        np.testing.assert_allclose(worker["predict"], [[-3.6], [-6.4]], rtol=1e-6)


def test_gc_optimizer_in_a_custom_loop_clips_the_aggregated_gradient(scenarios):
    """SGDGC: clip [3, 4] to [0.6, 0.8], centralize over the kernel's 2 inputs: [-0.1, 0.1]."""
    for worker in read(scenarios, "custom_loop"):
        np.testing.assert_allclose(worker["kernel"], [0.1, -0.1], atol=1e-6)
        np.testing.assert_allclose(worker["grad_norm"], 5.0, rtol=1e-6)


def _clipped_centralized(gradients, clip):
    norm = np.sqrt(sum(np.sum(g * g) for g in gradients))
    gradients = [g * clip / max(norm, clip) for g in gradients]
    return [g - g.mean(axis=0, keepdims=True) if g.ndim == 2 else g for g in gradients]


def test_a_nan_on_one_worker_skips_the_step_on_both(scenarios):
    workers = read(scenarios, "nan_skip")
    net = small_mlp()
    net.set_weights([np.array(w, np.float32) for w in workers[0]["initial"]])
    optimizer = keras.optimizers.Adam(0.01)
    applied = 0
    for step in range(len(workers[0]["batches"])):
        x = np.array([w["batches"][step][0][0] for w in workers], np.float32)
        y = np.array([w["batches"][step][1][0] for w in workers], np.float32)
        if not np.isfinite(x).all():
            continue
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.mean_squared_error(y, net(x)))
        gradients = [g.numpy() for g in tape.gradient(loss, net.trainable_variables)]
        optimizer.apply(_clipped_centralized(gradients, 10.0), net.trainable_variables)
        applied += 1
    assert applied == 2  # the step with worker 1's NaN is the one skipped
    for worker in workers:
        assert worker["history"]["skipped_steps"] == [1.0]  # counted once, not once per worker
        assert worker["iterations"] == applied
        for got, expected in zip(worker["weights"], net.get_weights()):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_an_overflow_on_one_worker_halves_the_loss_scale_on_both(scenarios):
    workers = read(scenarios, "mixed_precision")
    for worker in workers:
        assert worker["dynamic_scale"] == 2.0**14  # 2**15 halved once: the overflow was seen everywhere
        assert worker["iterations"] == 2  # three steps, the overflowing one skipped
        assert np.isfinite(np.concatenate([np.ravel(w) for w in worker["weights"]])).all()
    for a, b in zip(workers[0]["weights"], workers[1]["weights"]):
        np.testing.assert_array_equal(a, b)


def test_guessed_gradients_draw_independent_noise_on_each_worker(scenarios):
    workers = read(scenarios, "guessed")
    for a, b in zip(workers[0]["weights"], workers[1]["weights"]):
        np.testing.assert_array_equal(a, b)
    initial = [np.array(w, np.float32) for w in workers[0]["initial"]]
    rebuild = kgo.GuessedGradientModel(small_mlp(), method="weight_transpose", seed=7)
    rebuild.compile(optimizer="sgd", loss="mse")
    rebuild.model.set_weights(initial)
    step_seed = rebuild._seed_generator.next()
    guesses = []
    for task, worker in enumerate(workers):
        x, y = (np.array(t, np.float32) for t in worker["batches"][0])
        _, draws = rebuild.guess_gradients(x, y, seed=fold_in(step_seed, task), return_draws=True)
        guesses.append(numpy_weight_transpose_guess(initial, x, y, draws[0]))
    for got, w0, g0, g1 in zip(workers[0]["weights"], initial, *guesses):
        assert not np.allclose(g0, g1)  # each worker drew its own noise
        # SGD(0.5) on the sum of the replicas' guesses, each of its loss / 2 replicas.
        np.testing.assert_allclose(got, w0 - 0.5 * (g0 + g1) / 2, rtol=1e-4, atol=1e-6)
    assert not np.allclose(workers[0]["weights"][0], initial[0])


def test_one_all_reduce_of_the_gradient_per_step_as_plain_keras(scenarios):
    for worker in read(scenarios, "all_reduces"):
        keras_step, wrapper_step = worker["keras"], worker["wrapper"]
        assert sum(keras_step["bytes"]) == worker["gradient_bytes"]  # the baseline reduces the gradient once
        assert wrapper_step == keras_step  # values, their bytes and the collective ops in the graph


def test_a_killed_worker_stops_the_other_and_a_restart_resumes_from_the_backup(scenarios, tmp_path):
    uninterrupted = read(scenarios, "resumable")
    backup_dir = tmp_path / "backup"
    killed = {}

    def kill_worker_1_in_epoch_2(cluster):
        deadline = time.monotonic() + TIMEOUT
        while "EPOCH 1 BEGIN" not in cluster.output(1):
            assert time.monotonic() < deadline, cluster.output(1)[-2000:]
            time.sleep(0.05)
        time.sleep(0.6)  # one or two batches into the epoch (0.4 s each)
        cluster.kill(1)
        killed["at"] = time.monotonic() - cluster._started

    options = {"resumable": {"backup_dir": str(backup_dir), "slow": 0.4}}
    results, _ = launch(tmp_path, ["resumable"], options, on_start=kill_worker_1_in_epoch_2)
    survivor, victim = results
    assert victim.returncode < 0
    assert survivor.returncode != 0, survivor.output[-2000:]
    assert survivor.seconds - killed["at"] < 90  # it stopped with an error, it did not hang
    assert sorted(os.listdir(backup_dir)) == ["epoch_1"]

    results, _ = launch(tmp_path, ["resumable"], {"resumable": {"backup_dir": str(backup_dir)}})
    assert all(r.returncode == 0 for r in results), [r.output[-2000:] for r in results]
    for resumed, reference in zip(read(tmp_path, "resumable"), uninterrupted):
        assert resumed["iterations"] == reference["iterations"] == 12
        for got, expected in zip(resumed["weights"], reference["weights"]):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert not os.listdir(backup_dir)  # deleted once fit completed
