"""Train-step time of the GC optimizers relative to their Keras bases.

Median step time of SGDGC / AdamGC (each also with global_clipnorm=1) over
keras.optimizers.SGD / Adam on a small ResNet at CIFAR-10 size, batch 128,
with jit_compile True and False. All configurations are built first, then
timed interleaved (one step of each per round) in one process, so drift of
the machine hits all of them alike. Prints median ratios; target <= 1.03
under XLA.

    python benchmarks/optimizer_overhead.py [--rounds 40] [--batch-size 128]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_gradops as kgo  # noqa: E402
from cifar_resnet import small_resnet  # noqa: E402

PAIRS = [
    ("SGDGC", lambda: kgo.SGDGC(0.1, momentum=0.9), "SGD", lambda: keras.optimizers.SGD(0.1, momentum=0.9)),
    ("SGDGC+clip", lambda: kgo.SGDGC(0.1, momentum=0.9, global_clipnorm=1.0),
     "SGD+clip", lambda: keras.optimizers.SGD(0.1, momentum=0.9, global_clipnorm=1.0)),
    ("AdamGC", lambda: kgo.AdamGC(1e-3), "Adam", lambda: keras.optimizers.Adam(1e-3)),
    ("AdamGC+clip", lambda: kgo.AdamGC(1e-3, global_clipnorm=1.0),
     "Adam+clip", lambda: keras.optimizers.Adam(1e-3, global_clipnorm=1.0)),
]


def compiled_model(make_optimizer, jit_compile):
    model = small_resnet()
    model.compile(optimizer=make_optimizer(), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch_size)

    configs = {}
    for jit in (True, False):
        for gc_name, make_gc, base_name, make_base in PAIRS:
            for name, make in ((gc_name, make_gc), (base_name, make_base)):
                configs.setdefault((name, jit), compiled_model(make, jit))
    for model in configs.values():
        for _ in range(args.warmup):
            model.train_on_batch(x, y)

    times = {key: [] for key in configs}
    for _ in range(args.rounds):
        for key, model in configs.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[key].append(time.perf_counter() - start)

    median = {key: statistics.median(t) for key, t in times.items()}
    print(f"\nsmall ResNet, CIFAR-10 size, batch {args.batch_size}, "
          f"{args.rounds} interleaved steps per config, median step time")
    print(f"| {'optimizer':<12} | {'baseline':<10} | {'jit_compile':<11} | "
          f"{'median ms':>9} | {'base ms':>8} | {'ratio':>6} |")
    print(f"|{'-' * 14}|{'-' * 12}|{'-' * 13}|{'-' * 11}|{'-' * 10}|{'-' * 8}|")
    for jit in (True, False):
        for gc_name, _, base_name, _ in PAIRS:
            gc_ms, base_ms = median[(gc_name, jit)] * 1e3, median[(base_name, jit)] * 1e3
            print(f"| {gc_name:<12} | {base_name:<10} | {str(jit):<11} | "
                  f"{gc_ms:>9.1f} | {base_ms:>8.1f} | {gc_ms / base_ms:>6.3f} |")


if __name__ == "__main__":
    main()
