"""GradientOpsModel across worker processes against the cheapest correct baseline.

Two worker processes on localhost (``MultiWorkerMirroredStrategy``, one CPU
thread each on this 2-core machine) train a ReLU MLP (3072 inputs, two hidden
layers of ``--widths``, 10 outputs) on random data, global batch
``--batch-size``, AdamW:

- baseline: a plain ``keras.Model``'s own ``train_step`` (Keras'
  ``optimizer.apply`` all-reduces the gradient once), through a fixed
  ``tf.function`` that runs it on every replica (``model.fit`` itself fails
  under this strategy, keras-team/keras#20585);
- wrapper: ``GradientOpsModel(net, global_clipnorm=1.0, centralize=True)``
  through the same function.

The two are timed interleaved (``--steps`` steps of each per round,
``--rounds`` rounds), the chief prints the median and range of the per-round
step-time ratio, and the reductions one traced step of each makes
(``keras_gradops.reductions``): values, bytes, collective ops. Target: ratio
<= 1.05 and the same gradient bytes.

    python benchmarks/multi_worker.py [--widths 256 1024] [--rounds 15] [--steps 5]
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps of each configuration per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args):
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_gradops as kgo
    from keras_gradops import reductions

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 3072)).astype(np.float32)
    y = rng.integers(0, 10, size=args.batch_size)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    batches = iter(strategy.experimental_distribute_dataset(data))
    spec = (tf.TensorSpec((None, 3072), tf.float32), tf.TensorSpec((None,), tf.int64))
    report = {}
    for width in args.widths:
        models, steps, counts = {}, {}, {}
        for name in ("keras", "wrapper"):
            with strategy.scope():
                keras.utils.set_random_seed(0)
                net = keras.Sequential([keras.Input((3072,)), keras.layers.Dense(width, activation="relu"),
                                        keras.layers.Dense(width, activation="relu"), keras.layers.Dense(10)])
                model = net if name == "keras" else kgo.GradientOpsModel(net, global_clipnorm=1.0, centralize=True)
                model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=False,
                              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                model.optimizer.build(model.trainable_variables)
                if name == "wrapper":
                    model.make_train_function()
            counts[name] = reductions.train_step_reductions(model, spec)
            steps[name] = tf.function(lambda batch, model=model: strategy.run(model.train_step, args=(batch,)))
            models[name] = model
        for _ in range(args.warmup):
            for name in steps:
                steps[name](next(batches))
        ratios = []
        for _ in range(args.rounds):
            seconds = {}
            for name in steps:
                start = time.perf_counter()
                for _ in range(args.steps):
                    logs = steps[name](next(batches))
                strategy.experimental_local_results(logs["loss"])[0].numpy()  # wait for the last step
                seconds[name] = (time.perf_counter() - start) / args.steps
            ratios.append(seconds["wrapper"] / seconds["keras"])
        report[width] = {"counts": counts, "ratios": ratios,
                         "parameters": int(sum(np.prod(v.shape) for v in net.trainable_variables))}
    return report


def main():
    args = parse_args()
    if args.worker:
        report = worker(args)
        if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
            print("REPORT " + json.dumps(report), flush=True)
        return 0
    from keras_gradops.cluster import LocalCluster

    command = [sys.executable, os.path.abspath(__file__), "--worker", *sys.argv[1:]]
    with LocalCluster(command, 2) as cluster:
        results = cluster.wait(timeout=3600)
    for result in results:
        if result.returncode != 0:
            print(f"worker {result.index} failed:\n{result.output[-3000:]}", file=sys.stderr)
            return 1
    line = next(l for l in results[0].output.splitlines() if l.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    print(f"2 workers on localhost, ReLU MLP 3072-w-w-10, global batch {args.batch_size}, AdamW, "
          f"{args.rounds} rounds x {args.steps} interleaved steps")
    print("| width | parameters | step-time ratio, median (min-max) | gradient bytes all-reduced, keras / wrapper "
          "| reduced values, keras / wrapper | collective ops, keras / wrapper |")
    print("|---|---:|---:|---:|---:|---:|")
    for width, entry in report.items():
        ratios, counts = entry["ratios"], entry["counts"]
        bytes_ = [sum(b for b in counts[n]["bytes"] if b) for n in ("keras", "wrapper")]
        print(f"| {width} | {entry['parameters']:,} | {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}) | {bytes_[0]:,} / {bytes_[1]:,} "
              f"| {counts['keras']['values']} / {counts['wrapper']['values']} "
              f"| {counts['keras']['graph_collectives']} / {counts['wrapper']['graph_collectives']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
