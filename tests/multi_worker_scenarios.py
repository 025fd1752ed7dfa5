"""What each worker process of the multi-worker tests runs (not a test module itself).

    python tests/multi_worker_scenarios.py OUTPUT_DIR SCENARIO [SCENARIO ...]

Started by :class:`keras_gradops.cluster.LocalCluster` with a ``TF_CONFIG``
per worker; one ``MultiWorkerMirroredStrategy`` per process runs every
scenario named, in order, and the worker writes what it saw to
``OUTPUT_DIR/<scenario>.<task index>.json`` for ``tests/test_multi_worker.py``
to check against independent computations. Each worker's data is made here
from its task index, with auto-sharding off, so the test knows exactly which
examples each worker's replica saw.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_gradops as kgo  # noqa: E402
from keras_gradops import reductions  # noqa: E402
from keras_gradops.training.guessed.noise import fold_in  # noqa: E402

COLLECTIVE_TIMEOUT = 60


def per_example_output(y_true, y_pred):
    """A per-example loss whose gradient in a linear model's kernel is the input."""
    return y_pred[:, 0]


def unsharded(dataset):
    """Each worker iterates its own dataset whole; its replica takes its slice of each batch."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def linear_net(inputs, seed=0, kernel_initializer="zeros"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,)),
                             keras.layers.Dense(1, use_bias=False, kernel_initializer=kernel_initializer)])


def local_batches(strategy, dataset):
    """The batches this worker's replica receives in one epoch of ``fit``, as lists.

    With auto-sharding off, each global batch is cut into one batch per
    replica and a worker's one replica takes them in turn; ``fit`` runs
    ``dataset.cardinality()`` steps, so it sees the first that many.
    """
    batches = iter(strategy.experimental_distribute_dataset(dataset))
    return [
        tf.nest.map_structure(lambda t: t.numpy().tolist(), strategy.experimental_local_results(next(batches))[0])
        for _ in range(int(dataset.cardinality()))
    ]


def small_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu", name="hidden"),
                             keras.layers.Dense(3, name="out")])


# -- scenarios ------------------------------------------------------------------------------


def global_clip(strategy, task):
    """Worker 0's example is x = [6, 0], worker 1's x = [0, 8]; global_clipnorm=1, SGD(1)."""
    x = np.array([[6.0, 0.0]] if task == 0 else [[0.0, 8.0]], np.float32)
    data = unsharded(tf.data.Dataset.from_tensor_slices((np.repeat(x, 2, 0), np.zeros((2, 1), np.float32))).batch(2))
    with strategy.scope():
        model = kgo.GradientOpsModel(linear_net(2), global_clipnorm=1.0)
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=per_example_output, jit_compile=False)
    history = model.fit(data, epochs=1, verbose=0).history
    loss = model.evaluate(data, verbose=0)
    predictions = model.predict(unsharded(tf.data.Dataset.from_tensor_slices(np.repeat(x, 2, 0)).batch(2)), verbose=0)
    return {"kernel": model.model.get_weights()[0].ravel().tolist(), "history": history,
            "evaluate": loss, "predict": predictions.tolist()}


def custom_loop(strategy, task):
    """SGDGC with global_clipnorm=1 in strategy.run + optimizer.apply; x = [6, 0] and [0, 8] again."""
    x = tf.constant([[6.0, 0.0]] if task == 0 else [[0.0, 8.0]])
    with strategy.scope():
        net = linear_net(2)
        optimizer = kgo.SGDGC(learning_rate=1.0, global_clipnorm=1.0)
        optimizer.build(net.trainable_variables)

    @tf.function
    def step():
        def replica_step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(net(x)) / strategy.num_replicas_in_sync
            optimizer.apply(tape.gradient(loss, net.trainable_variables), net.trainable_variables)

        strategy.run(replica_step)

    step()
    return {"kernel": net.get_weights()[0].ravel().tolist(), "grad_norm": float(optimizer.grad_norm.numpy())}


def nan_skip(strategy, task):
    """Three steps; worker 1's second batch holds a NaN. Adam with skip_nonfinite."""
    rng = np.random.default_rng(10 + task)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.normal(size=(6, 3)).astype(np.float32)
    if task == 1:
        x[2:4, 1] = np.nan  # this worker's second batch, whichever row its replica takes
    data = unsharded(tf.data.Dataset.from_tensor_slices((x, y)).batch(2))
    with strategy.scope():
        model = kgo.GradientOpsModel(small_mlp(), skip_nonfinite=True, global_clipnorm=10.0, centralize=True)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", jit_compile=False)
    initial = [w.tolist() for w in model.model.get_weights()]
    history = model.fit(data, epochs=1, verbose=0).history
    return {
        "batches": local_batches(strategy, data), "initial": initial,
        "weights": [w.tolist() for w in model.model.get_weights()],
        "iterations": int(model.optimizer.iterations.numpy()), "history": history,
    }


def mixed_precision(strategy, task):
    """mixed_float16: worker 1's second batch overflows float16; the loss scale halves on both workers."""
    rng = np.random.default_rng(40 + task)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.normal(size=(6, 3)).astype(np.float32)
    if task == 1:
        x[2:4, 0] = 1e5  # float16 overflows to inf in the forward pass
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            model = kgo.GradientOpsModel(small_mlp(), global_clipnorm=10.0)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
        model.fit(unsharded(tf.data.Dataset.from_tensor_slices((x, y)).batch(2)), epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {"dynamic_scale": float(model.optimizer.dynamic_scale.numpy()),
            "iterations": int(model.optimizer.iterations.numpy()),
            "weights": [w.tolist() for w in model.model.get_weights()]}


def guessed(strategy, task):
    """One step of weight_transpose guesses; each replica draws with its index folded into the seed."""
    rng = np.random.default_rng(20 + task)
    x = rng.normal(size=(4, 4)).astype(np.float32)
    y = rng.normal(size=(4, 3)).astype(np.float32)
    with strategy.scope():
        model = kgo.GuessedGradientModel(small_mlp(), method="weight_transpose", seed=7)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=False)
    initial = [w.tolist() for w in model.model.get_weights()]
    data = unsharded(tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
    model.fit(data, epochs=1, verbose=0)
    return {"batches": local_batches(strategy, data), "initial": initial,
            "weights": [w.tolist() for w in model.model.get_weights()]}


def all_reduces(strategy, task):
    """The gradient reductions one traced train step makes: the wrapper against plain Keras."""

    spec = (tf.TensorSpec((None, 4), tf.float32), tf.TensorSpec((None, 3), tf.float32))
    counts = {}
    for name in ("keras", "wrapper"):
        with strategy.scope():
            net = small_mlp()
            model = net if name == "keras" else kgo.GradientOpsModel(net, global_clipnorm=1.0, centralize=True)
            model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="mse", jit_compile=False)
            model.optimizer.build(model.trainable_variables)
            if name == "wrapper":
                model.make_train_function()  # installs the chain on the optimizer's all-reduce
        counts[name] = reductions.train_step_reductions(model, spec)
    counts["gradient_bytes"] = int(sum(np.prod(v.shape) * 4 for v in net.trainable_variables))
    return counts


def resumable(strategy, task, backup_dir=None, epochs=3, slow=0.0):
    """Three epochs of Adam with clipping and GC under a multi-worker backup; optionally slow steps."""
    rng = np.random.default_rng(30 + task)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.normal(size=(8, 3)).astype(np.float32)
    data = unsharded(tf.data.Dataset.from_tensor_slices((x, y)).batch(2))
    with strategy.scope():
        model = kgo.GradientOpsModel(small_mlp(), global_clipnorm=1.0, centralize=True)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", jit_compile=False)
    callbacks = []
    if backup_dir:
        callbacks.append(kgo.callbacks.MultiWorkerBackupAndRestore(backup_dir))
    if slow:
        callbacks.append(SlowSteps(slow, task))
    model.fit(data, epochs=epochs, verbose=0, callbacks=callbacks)
    return {"weights": [w.tolist() for w in model.model.get_weights()],
            "iterations": int(model.optimizer.iterations.numpy())}


class SlowSteps(keras.callbacks.Callback):
    """Sleeps after each batch and marks the epochs reached, so a test can kill a worker mid-epoch."""

    def __init__(self, seconds, task):
        super().__init__()
        self.seconds, self.task = seconds, task

    def on_epoch_begin(self, epoch, logs=None):
        print(f"EPOCH {epoch} BEGIN", flush=True)

    def on_train_batch_end(self, batch, logs=None):
        import time

        time.sleep(self.seconds)


SCENARIOS = {fn.__name__: fn for fn in (global_clip, custom_loop, nan_skip, mixed_precision, guessed,
                                         all_reduces, resumable)}


def main(output_dir, names, **options):
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT)
    )
    for name in names:
        result = SCENARIOS[name](strategy, task, **options.get(name, {}))
        with open(os.path.join(output_dir, f"{name}.{task}.json"), "w") as f:
            json.dump(result, f)
        print(f"DONE {name}", flush=True)


if __name__ == "__main__":
    out, *requested = sys.argv[1:]
    extra = json.loads(os.environ.get("SCENARIO_OPTIONS", "{}"))
    main(out, requested, **extra)
