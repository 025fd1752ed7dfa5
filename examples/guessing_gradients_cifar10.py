"""How to guess a gradient: every method of GuessedGradientModel against backprop on CIFAR-10.

Singhal et al., "How to guess a gradient" (arXiv:2312.04709): a forward-mode
directional derivative scores a guess of the gradient; guessing in the
low-dimensional space the architecture fixes (the activations' span, the next
layer's weights) aligns far better with the true gradient than a random
weight-space direction. This script trains the paper's MLP (3072 -> 128 ->
128 -> 10, ReLU) with AdamW and the same budget under every method of
``keras_gradops.GuessedGradientModel`` -- directional descent, activation
perturbation, W^T, activation mixing, 1-layer downstream, and its own
"backprop" oracle -- and with plain Keras backprop; it prints train/test
accuracy and the cosine similarity between each step's guess and the true
gradient (``cosine_diagnostics=True``), and plots the curves.

Every method sees the same inputs: each pixel feature standardized with the
training split's mean and standard deviation (the usual preprocessing for
such MLPs). Pixels in [0, 1] are all non-negative, and that kills activation
mixing: its guess lives in the span of the layer's own ReLU outputs, whose
uncentered second moment is dominated by one all-positive direction (84% of
the trace at the first layer, 33% on standardized inputs), and non-negative
inputs turn a weight update into a shift of every example's pre-activation
at once; AdamW then pushes the first layer's units below zero together, and
a unit that stops firing gets a guess masked to zero and never recovers.
Measured on 10000-20000 images: the first layer's units fired on 47% of (unit,
image) pairs at init and on 0-2% after one epoch at lr 1e-3, 3e-4 and 1e-4
(test accuracy at chance, 0.08-0.11, after 3 epochs); standardized, 50%.

    python examples/guessing_gradients_cifar10.py --data-dir /work/shared/tfds   # ~10 min, 2 cores
    python examples/guessing_gradients_cifar10.py --quick                        # random stand-in data
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_utils  # noqa: E402

import keras_gradops as kgo  # noqa: E402
from keras_gradops.data import standardize  # noqa: E402

GUESS_METHODS = ("directional_descent", "activation_perturbation", "weight_transpose",
                 "activation_mixing", "one_layer_downstream", "backprop")
KERAS_BACKPROP = "keras backprop"


def build_mlp(width):
    inputs = keras.Input((32 * 32 * 3,), name="pixels")
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    hidden = keras.layers.Dense(width, activation="relu")(hidden)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(hidden), name="mlp")


def train_method(method, initial_weights, data, args):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)  # the same batch order for every method
    network = build_mlp(args.width)
    network.set_weights(initial_weights)
    if method == KERAS_BACKPROP:
        model = network
    else:
        model = kgo.GuessedGradientModel(network, method=method, cosine_diagnostics=True, seed=args.seed)
    model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=args.weight_decay),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=args.jit_compile)
    print(f"\n== {method} ==")
    with example_utils.Stopwatch() as watch:
        history = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                            validation_data=(x_test, y_test), verbose=args.verbose).history
    _, train_accuracy = model.evaluate(x_train, y_train, batch_size=1000, verbose=0)
    return {"history": history, "train_accuracy": train_accuracy, "test_accuracy": history["val_accuracy"][-1],
            "cosine": history.get("cosine_similarity"), "seconds": watch.seconds}


def plot(results, args):
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = dict(zip(results, plt.cm.tab10.colors))
    for method, result in results.items():
        history = result["history"]
        epochs = np.arange(1, len(history["loss"]) + 1)
        style = {"color": colors[method], "label": method, "linestyle": ":" if method == KERAS_BACKPROP else "-"}
        axes[0].plot(epochs, history["accuracy"], **style)
        axes[1].plot(epochs, history["val_accuracy"], **style)
        if result["cosine"] is not None:
            axes[2].plot(epochs, result["cosine"], **style)
    axes[0].set(xlabel="epoch", ylabel="train accuracy (epoch mean)", title="Train accuracy")
    axes[1].set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    axes[2].set(xlabel="epoch", ylabel="cosine(guess, true gradient), epoch mean",
                title="Cosine similarity to the true gradient")
    axes[2].set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"CIFAR-10, MLP 3072-{args.width}-{args.width}-10, AdamW lr {args.learning_rate}, "
                    f"{args.epochs} epochs, batch {args.batch_size}")
    return example_utils.save_figure(figure, args.out_dir, "guessed_gradients.png")


def main(argv=None):
    parser = example_utils.argument_parser("guessing_gradients_cifar10", __doc__.splitlines()[0])
    example_utils.add_data_dir_argument(parser)
    parser.add_argument("--methods", nargs="+", default=list(GUESS_METHODS) + [KERAS_BACKPROP],
                        choices=list(GUESS_METHODS) + [KERAS_BACKPROP])
    parser.add_argument("--num-train", type=int, default=None, help="default 50000, all (--quick: 512)")
    parser.add_argument("--num-test", type=int, default=None, help="default 10000, all (--quick: 256)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (--quick: 2)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="XLA; default on (off with --quick: compiling costs more than it saves there)")
    parser.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity (1: progress bars)")
    args = parser.parse_args(argv)
    args.num_train = args.num_train or (512 if args.quick else 50000)
    args.num_test = args.num_test or (256 if args.quick else 10000)
    args.epochs = args.epochs or (2 if args.quick else 20)
    args.jit_compile = not args.quick if args.jit_compile is None else args.jit_compile

    splits = example_utils.cifar10(args, (args.num_train, args.num_test))
    (x_train, y_train), (x_test, y_test) = [(x.reshape(len(x), -1), y) for x, y in splits]
    x_train, x_test = standardize(x_train, x_test)
    data = [(x_train, y_train), (x_test, y_test)]
    keras.utils.set_random_seed(args.seed)
    initial_weights = build_mlp(args.width).get_weights()
    results = {method: train_method(method, initial_weights, data, args) for method in args.methods}

    headers = ["method", "train accuracy", "test accuracy", "cosine similarity (last epoch)", "time (s)"]
    rows = [[method, r["train_accuracy"], r["test_accuracy"],
             "1 (exact)" if r["cosine"] is None else f"{r['cosine'][-1]:.4f}", f"{r['seconds']:.0f}"]
            for method, r in results.items()]
    example_utils.print_results(
        f"CIFAR-10 ({len(data[0][0])} train / {len(data[1][0])} test), MLP 3072-{args.width}-{args.width}-10, "
        f"AdamW lr {args.learning_rate} wd {args.weight_decay}, batch {args.batch_size}, {args.epochs} epochs:",
        headers, rows)
    figure = plot(results, args)
    return {"results": results, "rows": rows, "figure": figure}


if __name__ == "__main__":
    main()
