"""Guessed gradients for parameter-efficient fine-tuning of a ViT: LoRA and prompt tuning on CIFAR-10.

Singhal et al., "How to guess a gradient" (arXiv:2312.04709), fine-tune a
pretrained ViT-B/16 parameter-efficiently with guessed gradients. Pretrained
weights cannot be downloaded here, so this is that experiment honestly
scaled down:

1. Pretraining, plain Keras backprop: a small randomly initialized
   ``keras_hub.models.ViTBackbone`` (32x32 images, 4x4 patches, 4 layers,
   4 heads, width 64, MLP 128) with its class token's features into a
   ``Dense(5)`` head, AdamW, on CIFAR-10 classes 0-4 (train split); its test
   accuracy on classes 0-4 is printed.
2. Fine-tuning on classes 5-9 (labels remapped to 0-4), from the pretrained
   backbone, with a new ``Dense(5)`` head, two setups: ``lora``
   (``backbone.enable_lora(rank)``: LoRA on the attention's query and value,
   the rest of the backbone frozen) and ``prompts`` (the backbone frozen,
   ``keras_gradops.layers.PromptTokens`` after the class token, VPT-shallow).
   Every run rebuilds its model from the saved pretrained weights: no run
   shares state with another.
3. Methods, the same number of steps each, ``keras_gradops.GuessedGradientModel``
   with ``cosine_diagnostics=True`` (the mean cosine similarity between each
   step's guess and the true gradient): ``backprop`` (its exact oracle),
   ``activation_perturbation``, ``directional_descent``, ``spsa`` (MeZO's
   zeroth-order estimator) and ``weight_transpose`` (W^T). W^T pulls each
   guess back through the next layer's kernel, which needs a chain of
   layers; a ViT under a head is a graph, so GuessedGradientModel refuses
   it, and the table says so (the script runs W^T as soon as it is supported).
   AdamW: ``--lr`` for backprop, ``--guess-lr`` for every guessed method.

Inputs: pixels in [0, 1], standardized per channel with the mean and
standard deviation of the pretraining split (classes 0-4, train); the same
preprocessing in both phases. Output: per setup, a Markdown table of test
accuracy on classes 5-9 (mean +- sample std over ``--seeds`` seeds), mean
cosine to the true gradient, steps, and seconds per run and per step (the
median step after the first); then whether W^T beat directional descent
(mean test accuracy) or is not supported yet. ``main(argv)`` returns all
of it, per setup and method, per seed.

    python examples/fine_tuning_vit_cifar10.py --data-dir ../shared/tfds   # ~1.5 h on 2 cores (an estimate)
    python examples/fine_tuning_vit_cifar10.py --quick                     # ~30 s: random stand-in data, tiny ViT

The full run's duration is an estimate, not a measurement: ``--quick`` runs
with the full-size ViT (the flags above, batch 128, 1000 stand-in images,
12 steps per method) took 0.27 s per pretraining step and, per fine-tuning
step with the cosine diagnostics, 0.24-0.60 s (lora) and 0.27-0.46 s
(prompts) depending on the method, about 10 s per run to trace; times the
full run's 1960 pretraining steps and 24 runs of 500 steps, about 90
minutes. Those timings were taken while another CPU-heavy job shared the
2 cores, so an idle machine may well be faster.

Training compiles with Keras' default (XLA on TensorFlow); ``--no-jit-compile``
runs without it. XLA's first step is slow to compile (36 s for directional
descent at batch 128, 18 s for backprop); the steps after it are not.
"""

import argparse
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_utils  # noqa: E402

import keras_gradops as kgo  # noqa: E402

PEFTS = ("lora", "prompts")
METHODS = ("backprop", "activation_perturbation", "directional_descent", "spsa", "weight_transpose")
PRETRAIN_CLASSES, FINETUNE_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
NUM_CLASSES = 5
UNSUPPORTED = "not supported on this model: "
# The full run's model; --quick shrinks it unless a flag says otherwise.
FULL = {"patch_size": 4, "num_layers": 4, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128, "lora_rank": 4,
        "prompts": 8, "pretrain_epochs": 10, "steps": 500, "seeds": 3, "num_train": 50000, "num_test": 10000,
        "batch_size": 128}
QUICK = {"patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32, "lora_rank": 2,
         "prompts": 2, "pretrain_epochs": 1, "steps": 10, "seeds": 1, "num_train": 400, "num_test": 200,
         "batch_size": 32}


def build_backbone(args):
    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=args.patch_size, num_layers=args.num_layers,
        num_heads=args.num_heads, hidden_dim=args.hidden_dim, mlp_dim=args.mlp_dim)


def build_classifier(backbone):
    """The backbone's class token into a new ``Dense(5)`` head."""
    images = keras.Input((32, 32, 3), name="images")
    logits = keras.layers.Dense(NUM_CLASSES, name="head")(backbone(images)[:, 0])
    return keras.Model(images, logits, name="vit_classifier")


def build_finetune_net(peft, args, pretrained_weights):
    """A fresh fine-tuning model from the pretrained backbone weights.

    Returns:
        ``(net, backbone_weights)``: ``backbone_weights`` are the backbone's
        variables as pretrained (the order of ``pretrained_weights``), every
        one frozen (LoRA adds its own variables beside them).
    """
    backbone = build_backbone(args)
    backbone.set_weights(pretrained_weights)
    backbone_weights = list(backbone.weights)
    if peft == "lora":
        net = build_classifier(backbone)
        backbone.enable_lora(args.lora_rank)
        # keras_hub's enable_lora leaves the query and value layers' biases trainable; LoRA (Hu et al. 2021)
        # trains only A and B: freeze the biases too, so the whole pretrained backbone stays as it was.
        for layer in backbone._flatten_layers(include_self=False):
            if getattr(layer, "lora_enabled", False) and getattr(layer, "bias", None) is not None:
                layer.bias.trainable = False
    elif peft == "prompts":
        backbone.trainable = False
        images = keras.Input((32, 32, 3), name="images")
        tokens = backbone.get_layer("vit_patching_and_embedding")(images)
        tokens = kgo.layers.PromptTokens(args.prompts, index=1, name="prompts")(tokens)
        features = backbone.get_layer("vit_encoder")(tokens)
        net = keras.Model(images, keras.layers.Dense(NUM_CLASSES, name="head")(features[:, 0]),
                          name="vit_prompts")
    else:
        raise ValueError(f"Unknown peft {peft!r}; one of {PEFTS}.")
    return net, backbone_weights


def load_data(args):
    """``{"pretrain": [(x, y) train, (x, y) test], "finetune": [...]}``, standardized, labels 0-4."""
    (x_train, y_train), (x_test, y_test) = example_utils.cifar10(args, (args.num_train, args.num_test))

    def select(x, y, classes):
        keep = np.isin(y, classes)
        return x[keep], (y[keep] - classes[0]).astype("int64")

    pretrain = [select(x_train, y_train, PRETRAIN_CLASSES), select(x_test, y_test, PRETRAIN_CLASSES)]
    finetune = [select(x_train, y_train, FINETUNE_CLASSES), select(x_test, y_test, FINETUNE_CLASSES)]
    # Per channel, with the pretraining split's statistics, for both phases (as a released model's preprocessing).
    mean = pretrain[0][0].mean(axis=(0, 1, 2))
    std = pretrain[0][0].std(axis=(0, 1, 2))
    return {name: [(((x - mean) / std).astype("float32"), y) for x, y in splits]
            for name, splits in (("pretrain", pretrain), ("finetune", finetune))}


def accuracy(net, x, y, batch_size=500):
    """Test accuracy of ``net``'s argmax, computed here (eagerly, inference mode)."""
    predicted = np.concatenate([np.argmax(net(x[i:i + batch_size], training=False), axis=1)
                                for i in range(0, len(x), batch_size)])
    return float(np.mean(predicted == y))


def pretrain(data, args):
    keras.utils.set_random_seed(args.seed)
    backbone = build_backbone(args)
    net = build_classifier(backbone)
    net.compile(optimizer=keras.optimizers.AdamW(args.pretrain_lr, weight_decay=args.weight_decay),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                jit_compile=args.jit_compile)
    (x_train, y_train), (x_test, y_test) = data
    print(f"\n== pretraining on classes 0-4: {len(x_train)} images, {args.pretrain_epochs} epochs ==", flush=True)
    timer = StepTimer()
    with example_utils.Stopwatch() as watch:
        net.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.pretrain_epochs, verbose=args.verbose,
                callbacks=[timer])
    steps = args.pretrain_epochs * -(-len(x_train) // args.batch_size)
    return {"test_accuracy": accuracy(net, x_test, y_test), "backbone_weights": backbone.get_weights(),
            "seconds": watch.seconds, "step_seconds": timer.step_seconds, "steps": steps,
            "trainable_params": count(net.trainable_variables)}


class StepTimer(keras.callbacks.Callback):
    """Seconds of each training step (the first one traces and compiles)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)

    @property
    def step_seconds(self):
        """The median step after the first (``nan`` without one)."""
        return float(np.median(self.seconds[1:])) if len(self.seconds) > 1 else float("nan")


def count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def first_sentence(message):
    match = re.match(r"(.+?[.!?])(\s|$)", message, re.DOTALL)
    return (match.group(1) if match else message).strip()


def batches(x, y, seed, batch_size):
    """Shuffled batches without end, the same order for every method of a seed."""
    x, y = tf.constant(x), tf.constant(y)
    order = tf.data.Dataset.range(len(x)).shuffle(len(x), seed=seed).repeat().batch(batch_size, drop_remainder=True)
    return order.map(lambda i: (tf.gather(x, i), tf.gather(y, i))).prefetch(1)


def finetune(peft, method, seed, pretrained_weights, data, args):
    """One run: ``{"test_accuracy", "cosine", "steps", "backbone_after", ...}`` or ``{"unsupported", "error"}``."""
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)  # head, LoRA and prompt initializers
    net, backbone_weights = build_finetune_net(peft, args, pretrained_weights)
    options = {"perturbation_scale": args.spsa_eps} if method == "spsa" else {}
    try:
        model = kgo.GuessedGradientModel(net, method=method, cosine_diagnostics=True, seed=seed, **options)
    except ValueError as error:
        return {"unsupported": UNSUPPORTED + first_sentence(str(error)), "error": str(error)}
    learning_rate = args.lr if method == "backprop" else args.guess_lr
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=args.weight_decay),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=args.jit_compile)
    print(f"\n== {peft}, {method}, seed {seed}: {count(net.trainable_variables)} trainable parameters ==",
          flush=True)
    timer = StepTimer()
    with example_utils.Stopwatch() as watch:
        history = model.fit(batches(x_train, y_train, seed, args.batch_size), epochs=1, steps_per_epoch=args.steps,
                            shuffle=False, verbose=args.verbose, callbacks=[timer]).history
    return {"test_accuracy": accuracy(net, x_test, y_test), "cosine": float(history["cosine_similarity"][-1]),
            "steps": args.steps, "seconds": watch.seconds, "step_seconds": timer.step_seconds,
            "trainable_params": count(net.trainable_variables),
            "backbone_after": [v.numpy() for v in backbone_weights]}


def summarize(runs):
    """Per method: accuracies and cosines per seed, steps, seconds, or the reason it is not supported."""
    if "unsupported" in runs[0]:
        return {"unsupported": runs[0]["unsupported"], "error": runs[0]["error"], "test_accuracy": [],
                "cosine": [], "steps": None}
    return {"unsupported": None, "test_accuracy": [r["test_accuracy"] for r in runs],
            "cosine": [r["cosine"] for r in runs], "steps": runs[0]["steps"],
            "seconds": [r["seconds"] for r in runs], "step_seconds": [r["step_seconds"] for r in runs],
            "trainable_params": runs[0]["trainable_params"],
            "backbone_after": [r["backbone_after"] for r in runs]}


def mean_std(values):
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.4f} ± {std:.4f}"


def verdict(results):
    """Whether W^T beat directional descent (mean test accuracy), as a sentence; ``(sentence, bool or None)``."""
    wt, dd = results.get("weight_transpose"), results.get("directional_descent")
    if wt is None or dd is None:
        return "W^T against directional descent: not both run.", None
    if wt["unsupported"]:
        return f"W^T is not supported on this model yet ({wt['unsupported'][len(UNSUPPORTED):]}).", None
    if dd["unsupported"]:
        return "Directional descent did not run: no comparison.", None
    beat = float(np.mean(wt["test_accuracy"])) > float(np.mean(dd["test_accuracy"]))
    return (f"W^T {'beat' if beat else 'did not beat'} directional descent: mean test accuracy "
            f"{np.mean(wt['test_accuracy']):.4f} vs {np.mean(dd['test_accuracy']):.4f}, mean cosine "
            f"{np.mean(wt['cosine']):.4g} vs {np.mean(dd['cosine']):.4g}."), beat


def main(argv=None):
    parser = example_utils.argument_parser("fine_tuning_vit_cifar10", __doc__.splitlines()[0])
    example_utils.add_data_dir_argument(parser)
    parser.add_argument("--pefts", nargs="+", choices=PEFTS, default=list(PEFTS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    for name, value in FULL.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {value} (--quick: {QUICK[name]})")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate of backprop")
    parser.add_argument("--guess-lr", type=float, default=1e-4, help="fine-tuning learning rate of guessed methods")
    parser.add_argument("--spsa-eps", type=float, default=1e-3, help="spsa's perturbation scale (MeZO's 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="XLA in both phases (Keras' default on TensorFlow)")
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    args = parser.parse_args(argv)
    for name, value in FULL.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else value)

    data = load_data(args)
    pretrained = pretrain(data["pretrain"], args)
    print(f"\nPretraining test accuracy on classes 0-4 ({len(data['pretrain'][1][0])} images): "
          f"{pretrained['test_accuracy']:.4f} ({pretrained['steps']} steps, {pretrained['seconds']:.0f} s, "
          f"{pretrained['step_seconds']:.3f} s per step)")

    seeds = [args.seed + i for i in range(args.seeds)]
    results, verdicts = {}, {}
    for peft in args.pefts:
        results[peft] = {method: summarize([finetune(peft, method, seed, pretrained["backbone_weights"],
                                                     data["finetune"], args) for seed in seeds])
                         for method in args.methods}
        rows = []
        for method, r in results[peft].items():
            if r["unsupported"]:
                rows.append([method, r["unsupported"], "-", "-", "-", "-"])
            else:
                rows.append([method, mean_std(r["test_accuracy"]), f"{np.mean(r['cosine']):.4g}", r["steps"],
                             f"{np.mean(r['seconds']):.1f}", f"{np.mean(r['step_seconds']):.3f}"])
        params = next((r["trainable_params"] for r in results[peft].values() if not r["unsupported"]), "?")
        example_utils.print_results(
            f"{peft}: fine-tuning on CIFAR-10 classes 5-9 ({len(data['finetune'][0][0])} train / "
            f"{len(data['finetune'][1][0])} test), {params} trainable parameters, ViT {args.num_layers} layers "
            f"width {args.hidden_dim}, AdamW (backprop lr {args.lr}, guesses lr {args.guess_lr}), batch "
            f"{args.batch_size}, {len(seeds)} seed(s):",
            ["method", "test accuracy (mean ± std)", "mean cosine to the true gradient", "steps",
             "seconds per run", "seconds per step"], rows)
        verdicts[peft], _ = verdict(results[peft])
        print(f"{peft}: {verdicts[peft]}", flush=True)
    frozen_unchanged = all(np.array_equal(a, b) for per_peft in results.values() for r in per_peft.values()
                           for after in r.get("backbone_after", [])
                           for a, b in zip(pretrained["backbone_weights"], after))
    print(f"\nFrozen backbone weights bit-for-bit the pretrained ones after every run: {frozen_unchanged}")
    return {"args": args, "pretrain_accuracy": pretrained["test_accuracy"], "pretrain": pretrained,
            "pretrained_weights": pretrained["backbone_weights"], "results": results, "verdicts": verdicts,
            "frozen_unchanged": frozen_unchanged, "seeds": seeds}


if __name__ == "__main__":
    main()
