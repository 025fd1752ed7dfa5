"""GradientStatsRecorder: per-step per-layer gradient statistics and the PNG plot.

With a zero learning rate the weights stay fixed, so the statistics of every
step can be recomputed independently with tf.GradientTape on the same batch.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradops as kgo
from keras_gradops.callbacks import GradientStatsRecorder, plot_gradient_stats

RNG = np.random.default_rng(2)


def conv_net():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((5, 5, 2)), keras.layers.Conv2D(4, 3, name="conv"), keras.layers.Flatten(name="flatten"),
         keras.layers.Dense(2, name="out")]
    )


def layer_stats(net, x, y, layer, centralize):
    """[L2 norm, max |g|] of ``layer``'s gradient, optionally centralized, in NumPy."""
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, net(x))
    grads = tape.gradient(loss, net.get_layer(layer).trainable_variables)
    grads = [g.numpy().astype(np.float64) for g in grads]
    if centralize:
        grads = [g - g.mean(axis=tuple(range(g.ndim - 1)), keepdims=True) if g.ndim > 1 else g for g in grads]
    return np.sqrt(sum(np.sum(g**2) for g in grads)), max(np.max(np.abs(g)) for g in grads)


@pytest.mark.examples_extra  # the PNG needs matplotlib
@pytest.mark.parametrize("stage", ["applied", "raw"])
def test_records_each_steps_layer_statistics_and_writes_a_png(tmp_path, stage):
    import matplotlib.image

    x = RNG.normal(size=(12, 5, 5, 2)).astype("float32")
    y = RNG.normal(size=(12, 2)).astype("float32")
    reference = conv_net()
    path = tmp_path / "gradients.png"
    recorder = GradientStatsRecorder(["conv", "out"], path=str(path), stage=stage)
    model = kgo.GradientOpsModel(conv_net(), centralize=True)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse", jit_compile=True)

    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[recorder], verbose=0)

    for layer in ("conv", "out"):
        record = recorder.history[layer]
        assert record["step"] == [1, 2, 3, 4, 5, 6]
        for step, start in enumerate([0, 4, 8, 0, 4, 8]):
            l2, max_abs = layer_stats(reference, x[start:start + 4], y[start:start + 4], layer, stage == "applied")
            np.testing.assert_allclose(record["l2_norm"][step], l2, rtol=1e-5)
            np.testing.assert_allclose(record["max_abs"][step], max_abs, rtol=1e-5)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    assert model._gradient_probe is None  # recording stops with training


@pytest.mark.examples_extra  # the plot needs matplotlib
def test_every_n_steps_and_a_comparison_plot(tmp_path):
    import matplotlib.image

    x = RNG.normal(size=(16, 5, 5, 2)).astype("float32")
    y = RNG.normal(size=(16, 2)).astype("float32")
    runs = {}
    for name, centralize in (("with GC", True), ("without GC", False)):
        recorder = GradientStatsRecorder(["conv"], every_n_steps=2)
        model = kgo.GradientOpsModel(conv_net(), centralize=centralize)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(x, y, batch_size=2, shuffle=False, callbacks=[recorder], verbose=0)
        runs[name] = recorder.history
        assert recorder.history["conv"]["step"] == [2, 4, 6, 8]

    path = plot_gradient_stats(runs, str(tmp_path / "compare.png"), title="conv")
    assert matplotlib.image.imread(path).shape[-1] in (3, 4)


def test_bad_arguments():
    with pytest.raises(TypeError, match="GradientOpsModel"):
        plain = conv_net()
        plain.compile(optimizer="sgd", loss="mse")
        plain.fit(np.zeros((2, 5, 5, 2)), np.zeros((2, 2)), callbacks=[GradientStatsRecorder(["conv"])], verbose=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientStatsRecorder(["conv"], every_n_steps=0)
    model = kgo.GradientOpsModel(conv_net())
    with pytest.raises(ValueError, match="stage"):
        model.watch_gradients(["conv"], stage="after")
    with pytest.raises(ValueError, match="No layer 'nope'"):
        model.watch_gradients(["nope"])
    with pytest.raises(ValueError, match="no trainable weights"):
        model.watch_gradients(["flatten"])


# ---------------------------------------------------------------- TensorBoard


def read_scalars(log_dir):
    """``{tag: {step: value}}`` of every scalar in the event files under ``log_dir``, read back."""
    import glob

    scalars = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                scalars.setdefault(value.tag, {})[event.step] = number
    return scalars


@pytest.mark.examples_extra  # tf.summary needs TensorBoard (tensorflow-nightly does not bring it)
def test_telemetry_and_layer_statistics_reach_tensorboard_event_files(tmp_path):
    x = RNG.normal(size=(24, 5, 5, 2)).astype("float32")
    y = RNG.normal(size=(24, 2)).astype("float32")
    x[9, 0, 0, 0] = np.nan  # one skipped step
    model = kgo.GradientOpsModel(conv_net(), global_clipnorm=kgo.AutoClip(quantile=0.5, history=8),
                                 skip_nonfinite=True, layer_norms=True)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    recorder = GradientStatsRecorder(["conv", "out"], stage="raw", log_dir=str(tmp_path / "gradients"))
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "board"))
    history = model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=[board, recorder]).history

    epochs = read_scalars(tmp_path / "board")
    for name in ("loss", "grad_norm", "clipped_fraction", "clip_threshold", "skipped_steps",
                 "grad_norm/conv", "grad_norm/out"):
        logged = epochs[f"epoch_{name}"]
        np.testing.assert_allclose([logged[e] for e in range(3)], history[name], rtol=1e-6, err_msg=name)
    assert history["skipped_steps"] == [1.0, 1.0, 1.0]

    steps = read_scalars(tmp_path / "gradients")
    for layer in ("conv", "out"):
        record = recorder.history[layer]
        assert record["step"] == list(range(1, 19))
        skipped = [s for s, v in zip(record["step"], record["l2_norm"]) if np.isnan(v)]
        assert skipped == [3, 9, 15]  # the poisoned batch, once per epoch
        for statistic in ("l2_norm", "max_abs"):
            logged = steps[f"gradient/{layer}/{statistic}"]
            np.testing.assert_allclose([logged[s] for s in record["step"]], record[statistic], rtol=1e-6)
