"""Train-step time of the GC optimizers relative to their Keras bases.

Median step time of SGDGC / AdamGC (each also with global_clipnorm=1) over
keras.optimizers.SGD / Adam on a small ResNet at CIFAR-10 size, batch 128
(random data), with jit_compile True and False, timed interleaved in one
process. Prints median ratios (wall clock and CPU time); target <= 1.03 under
XLA.

    python benchmarks/optimizer_overhead.py [--rounds 40] [--batch-size 128]
"""

import keras

import keras_gradops as kgo
from cifar_step_timing import (
    compile_for_timing,
    interleaved_medians,
    parse_timing_arguments,
    print_ratio_table,
    random_cifar_batch,
    small_resnet,
)

PAIRS = {  # name: (make optimizer, baseline name, make baseline)
    "SGDGC": (lambda: kgo.SGDGC(0.1, momentum=0.9),
              "SGD", lambda: keras.optimizers.SGD(0.1, momentum=0.9)),
    "SGDGC+clip": (lambda: kgo.SGDGC(0.1, momentum=0.9, global_clipnorm=1.0),
                   "SGD+clip", lambda: keras.optimizers.SGD(0.1, momentum=0.9, global_clipnorm=1.0)),
    "AdamGC": (lambda: kgo.AdamGC(1e-3), "Adam", lambda: keras.optimizers.Adam(1e-3)),
    "AdamGC+clip": (lambda: kgo.AdamGC(1e-3, global_clipnorm=1.0),
                    "Adam+clip", lambda: keras.optimizers.Adam(1e-3, global_clipnorm=1.0)),
}


def main():
    args = parse_timing_arguments(__doc__.splitlines()[0])
    x, y = random_cifar_batch(args.batch_size)
    makers = {}
    for name, (make, base_name, make_base) in PAIRS.items():
        makers[name], makers[base_name] = make, make_base
    models = {(name, jit): compile_for_timing(small_resnet(), make(), jit)
              for jit in (True, False) for name, make in makers.items()}
    medians = interleaved_medians(models, x, y, args.rounds, args.warmup)
    rows = [(name, base_name, jit, medians[(name, jit)], medians[(base_name, jit)])
            for jit in (True, False) for name, (_, base_name, _) in PAIRS.items()]
    print_ratio_table(f"small ResNet, CIFAR-10 size, batch {args.batch_size}, "
                      f"{args.rounds} interleaved steps per config, medians", rows)


if __name__ == "__main__":
    main()
