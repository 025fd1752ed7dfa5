"""Training across worker processes: ``MultiWorkerMirroredStrategy`` with ``GradientOpsModel``.

With ``--workers N`` this script starts N copies of itself on this machine
(free localhost ports, one ``TF_CONFIG`` each), shows the chief's Keras
progress, and prints one row per worker: final loss, ``grad_norm``, test
accuracy and a checksum of the final weights, which must be equal on every
worker. It exits non-zero if any worker fails or the weights differ.

Each worker builds the same ``tf.data`` pipeline, sharded by element across
workers (``AutoShardPolicy.DATA``), trains a ``GradientOpsModel`` (global-norm
clipping of the aggregated gradient, gradient centralization, skipping of
non-finite steps) with AdamW, and backs up to ``--backup-dir`` at each epoch's
end (the chief writes, every worker restores: kill a worker, start them all
again, and training resumes at the last epoch backed up).

    python examples/multi_worker.py --workers 2                         # digits, ~30 s
    python examples/multi_worker.py --workers 2 --data-dir ../shared/tfds --epochs 5   # CIFAR-10
    python examples/multi_worker.py --workers 2 --quick                 # the test suite's run

On real hosts, run one worker per host with its own ``TF_CONFIG`` (worker 0 is
the chief), the same arguments and a ``--backup-dir`` on storage every host
reads::

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}' \\
        python examples/multi_worker.py --worker --result-dir results
    # under SLURM (srun, one task per node): --worker --cluster-resolver slurm
"""

import hashlib
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_utils  # noqa: E402

import keras_gradops as kgo  # noqa: E402
from keras_gradops.cluster import LocalCluster, is_chief  # noqa: E402
from keras_gradops.data import load_digits  # noqa: E402

COLLECTIVE_TIMEOUT = 120
HEADERS = ["worker", "final loss", "grad_norm", "test accuracy", "weights sha256", "weights sum"]


def parse_args(argv=None):
    parser = example_utils.argument_parser("multi_worker", __doc__.splitlines()[0])
    example_utils.add_data_dir_argument(parser)
    parser.add_argument("--workers", type=int, default=2, help="worker processes to start on localhost")
    parser.add_argument("--worker", action="store_true",
                        help="run as one worker (TF_CONFIG in the environment, or --cluster-resolver)")
    parser.add_argument("--cluster-resolver", choices=["tf_config", "slurm"], default="tf_config")
    parser.add_argument("--result-dir", help="where each worker writes its result (worker mode)")
    parser.add_argument("--backup-dir", help="backup directory (default: <out-dir>/backup)")
    parser.add_argument("--epochs", type=int, default=None, help="default 10, 1 with --quick")
    parser.add_argument("--batch-size", type=int, default=64, help="the GLOBAL batch size")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the workers are killed")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 10
    if args.backup_dir is None:
        args.backup_dir = os.path.join(args.out_dir, "backup")
    return args


# -- one worker ---------------------------------------------------------------------------------


def load_data(args):
    """``(x_train, y_train), (x_test, y_test)``: digits, or CIFAR-10 with --data-dir; the same on every worker."""
    if args.data_dir is None:
        (x_train, y_train), test = load_digits(seed=args.seed)
        if args.quick:
            x_train, y_train = x_train[:512], y_train[:512]
        return (x_train, y_train), test
    sizes = (2048, 512) if args.quick else (50000, 10000)
    return [(x.reshape(len(x), -1), y) for x, y in example_utils.cifar10(args, sizes)]


def sharded(x, y, batch_size, seed=None):
    """Global batches of ``batch_size`` (shuffled with ``seed``, the same order on every worker);
    each worker takes its share of every batch's elements."""
    keep = len(x) - len(x) % batch_size  # whole batches only, so every worker runs the same number of steps
    dataset = tf.data.Dataset.from_tensor_slices((x[:keep], y[:keep]))
    if seed is not None:
        dataset = dataset.shuffle(keep, seed=seed)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def build_net(inputs, seed):
    keras.utils.set_random_seed(seed)  # the same initial weights on every worker
    return keras.Sequential([
        keras.Input((inputs,), name="pixels"),
        keras.layers.Dense(256, activation="relu", name="hidden1"),
        keras.layers.Dense(256, activation="relu", name="hidden2"),
        keras.layers.Dense(10, name="logits"),
    ])


def run_worker(args):
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver() if args.cluster_resolver == "slurm" else None
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver,
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT),
    )
    task = strategy.cluster_resolver.task_id
    chief = is_chief(strategy)
    (x_train, y_train), (x_test, y_test) = load_data(args)
    with strategy.scope():
        model = kgo.GradientOpsModel(build_net(x_train.shape[1], args.seed), global_clipnorm=1.0,
                                     centralize=True, skip_nonfinite=True)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(sharded(x_train, y_train, args.batch_size, seed=args.seed), epochs=args.epochs,
                        shuffle=False, verbose=2 if chief else 0,
                        callbacks=[kgo.callbacks.MultiWorkerBackupAndRestore(args.backup_dir)])
    _, accuracy = model.evaluate(sharded(x_test, y_test, args.batch_size), verbose=0)
    weights = model.model.get_weights()
    digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()
    result = {
        "worker": task, "final loss": history.history["loss"][-1], "grad_norm": history.history["grad_norm"][-1],
        "test accuracy": float(accuracy), "weights sha256": digest[:16],
        "weights sum": float(sum(np.sum(w, dtype=np.float64) for w in weights)),
    }
    if args.result_dir:
        with open(os.path.join(args.result_dir, f"worker{task}.json"), "w") as f:
            json.dump(result, f)
        np.savez(os.path.join(args.result_dir, f"worker{task}.weights.npz"), *weights)
    return result


# -- the launcher -------------------------------------------------------------------------------


def launch(args, argv):
    """Starts ``--workers`` copies of this script in worker mode; returns the exit status."""
    result_dir = args.result_dir or tempfile.mkdtemp(prefix="multi_worker_")
    os.makedirs(result_dir, exist_ok=True)
    command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", "--result-dir", result_dir]
    print(f"starting {args.workers} workers on localhost; results in {result_dir}", flush=True)
    with LocalCluster(command, args.workers) as cluster:
        results = cluster.wait(timeout=args.timeout, echo=0)
    failed = [r for r in results if r.returncode != 0]
    for result in failed:
        print(f"\nworker {result.index} failed (exit {result.returncode}):\n{result.output[-3000:]}", file=sys.stderr)
    rows = []
    for index in range(args.workers):
        path = os.path.join(result_dir, f"worker{index}.json")
        if os.path.exists(path):
            with open(path) as f:
                worker = json.load(f)
            rows.append([worker[h] for h in HEADERS])
    example_utils.print_results(f"{args.workers} workers, {args.epochs} epochs, global batch {args.batch_size}",
                                HEADERS, rows)
    same = len({row[HEADERS.index("weights sha256")] for row in rows}) == 1 and len(rows) == args.workers
    print("final weights equal on every worker:", "yes" if same else "NO")
    return 0 if same and not failed else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    return launch(args, [a for a in argv if a != "--worker"])


if __name__ == "__main__":
    sys.exit(main())
