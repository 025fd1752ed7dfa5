"""Quickstart, the README's main job: a Keras optimizer against its gradient-centralized twin.

Trains one small MLP on scikit-learn's 8x8 handwritten digits (shipped with
scikit-learn: offline) twice, from the same initial weights and the same
batches: with ``keras.optimizers.SGD`` (momentum 0.9, global-norm clipping at
1.0) and with ``keras_gradops.SGDGC``, the same update plus gradient
centralization (Yong et al., ECCV 2020). Prints final train/test accuracy and
training time, saves the curves, and exports the model with the better test
accuracy for TensorFlow Serving into ``saved_models/digits_mlp/<version>/``.

    python examples/quickstart.py            # ~20 s on 2 CPU cores
    python examples/quickstart.py --quick    # ~5 s
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_utils  # noqa: E402

import keras_gradops as kgo  # noqa: E402
from keras_gradops.data import load_digits  # noqa: E402
from keras_gradops.serving import export_for_serving  # noqa: E402

MODEL_NAME = "digits_mlp"


def build_model():
    inputs = keras.Input((64,), name="pixels")
    hidden = keras.layers.Dense(128, activation="relu")(inputs)
    hidden = keras.layers.Dense(128, activation="relu")(hidden)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(hidden)
    return keras.Model(inputs, outputs, name=MODEL_NAME)


def optimizers(learning_rate):
    """The Keras optimizer and its GC counterpart, same hyperparameters, clipping on."""
    settings = {"learning_rate": learning_rate, "momentum": 0.9, "global_clipnorm": 1.0}
    return {
        "keras SGD": keras.optimizers.SGD(**settings),
        "keras_gradops SGDGC": kgo.SGDGC(**settings),
    }


def train(optimizer, initial_weights, data, args):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)  # the same batch order for every optimizer
    model = build_model()
    model.set_weights(initial_weights)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with example_utils.Stopwatch() as watch:
        history = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                            validation_data=(x_test, y_test), verbose=args.verbose)
    train_loss, train_accuracy = model.evaluate(x_train, y_train, verbose=0)
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    return model, history.history, {
        "train_loss": train_loss, "train_accuracy": train_accuracy,
        "test_loss": test_loss, "test_accuracy": test_accuracy, "seconds": watch.seconds,
    }


def plot_curves(histories, out_dir):
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, history), color in zip(histories.items(), ("tab:blue", "tab:orange")):
        epochs = np.arange(1, len(history["loss"]) + 1)
        loss_axes.plot(epochs, history["loss"], color=color, label=f"{name} train")
        loss_axes.plot(epochs, history["val_loss"], color=color, linestyle="--", label=f"{name} test")
        accuracy_axes.plot(epochs, history["accuracy"], color=color, label=f"{name} train")
        accuracy_axes.plot(epochs, history["val_accuracy"], color=color, linestyle="--", label=f"{name} test")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="Loss")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    accuracy_axes.legend()
    figure.suptitle("Digits MLP: SGD vs SGDGC (momentum 0.9, global clipnorm 1.0)")
    return example_utils.save_figure(figure, out_dir, "curves.png")


def main(argv=None):
    parser = example_utils.argument_parser("quickstart", __doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default 40 (--quick: 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--export-dir", default=os.path.join(example_utils.REPO_ROOT, "saved_models"),
                        help="TF Serving base directory (default: %(default)s)")
    parser.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity (1: progress bars)")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (3 if args.quick else 40)

    data = load_digits(seed=args.seed)
    keras.utils.set_random_seed(args.seed)
    initial_weights = build_model().get_weights()

    models, histories, results = {}, {}, {}
    for name, optimizer in optimizers(args.learning_rate).items():
        print(f"\n== {name} ==")
        models[name], histories[name], results[name] = train(optimizer, initial_weights, data, args)

    headers = ["optimizer", "train accuracy", "test accuracy", "train loss", "test loss", "time (s)"]
    rows = [[name, r["train_accuracy"], r["test_accuracy"], r["train_loss"], r["test_loss"], f"{r['seconds']:.1f}"]
            for name, r in results.items()]
    example_utils.print_results(
        f"Digits MLP, {args.epochs} epochs, batch {args.batch_size}, learning rate {args.learning_rate}:",
        headers, rows)
    figure = plot_curves(histories, args.out_dir)

    best = max(results, key=lambda name: results[name]["test_accuracy"])
    path = export_for_serving(models[best], args.export_dir, name=MODEL_NAME)
    served = tf.saved_model.load(path).signatures["serving_default"]
    x_test = data[1][0][:16]
    difference = np.max(np.abs(served(pixels=tf.constant(x_test))["probabilities"].numpy()
                               - models[best].predict(x_test, verbose=0)))
    print(f"Exported the {best} model for TF Serving: {path}\n"
          f"  reloaded SavedModel vs model.predict: max |difference| = {difference:.2e}\n"
          f"  serve it: docker run -p 8501:8501 -v \"{os.path.abspath(os.path.dirname(path))}:/models/{MODEL_NAME}\" "
          f"-e MODEL_NAME={MODEL_NAME} tensorflow/serving\n"
          f"  request body: python examples/serving_request.py {path}")
    return {"results": results, "histories": histories, "figure": figure, "export_path": path, "best": best}


if __name__ == "__main__":
    main()
