"""Small datasets for the examples, as NumPy arrays.

Real datasets load through ``tensorflow-datasets`` (``load_tfds``) or ship
inside scikit-learn (``load_digits``); ``synthetic_images`` makes a learnable
random stand-in in-process, for smoke tests with neither network nor files.
``standardize`` centers and scales features with the training split's statistics.
``tensorflow_datasets`` and ``sklearn`` are imported only when used (they are
in the ``examples`` extra, not in the package's dependencies).
"""

import numpy as np


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither prepared in ``data_dir`` nor downloadable."""


def load_tfds(name, data_dir=None, splits=("train", "test"), download=True):
    """Loads whole TFDS splits as ``(images, labels)`` NumPy arrays.

    Args:
        name: a ``tensorflow-datasets`` name with ``image`` and ``label``
            features, e.g. ``"cifar10"``.
        data_dir: a directory holding a prepared copy (the folder that
            contains ``<name>/<version>/``); ``None`` for TFDS' default,
            ``~/tensorflow_datasets``.
        splits: split names to return, in order.
        download: download and prepare the dataset if it is not prepared.

    Returns:
        A list with one ``(images, labels)`` pair per split (``uint8`` images,
        ``int64`` labels).

    Raises:
        DatasetUnavailableError: not prepared in ``data_dir`` and not
            downloadable (no network, or ``download=False``); the message says
            how to prepare a copy and pass it as ``data_dir``.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise DatasetUnavailableError(_how_to_provide(name, data_dir, "download=False"))
        print(f"Downloading {name!r} to {builder.data_dir} (pass --data-dir with a prepared copy to skip).")
        try:
            builder.download_and_prepare()
        except Exception as error:  # tfds raises many types when offline; the cause stays chained.
            raise DatasetUnavailableError(
                _how_to_provide(name, data_dir, f"{type(error).__name__}: {error}")) from error
    arrays = []
    for split in splits:
        batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        arrays.append((batch["image"], batch["label"]))
    return arrays


def _how_to_provide(name, data_dir, reason):
    where = data_dir or "~/tensorflow_datasets"
    return (
        f"The TFDS dataset {name!r} is not prepared in {where!r} and could not be downloaded "
        f"({reason}). On a machine with network, run\n"
        f"    python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"\n"
        f"then copy DIR (it holds '{name}/<version>/') here and pass it with --data-dir DIR "
        f"(data_dir=DIR), or put it at ~/tensorflow_datasets."
    )


def load_digits(test_fraction=0.25, seed=0):
    """scikit-learn's 8x8 handwritten digits (shipped with it: no download).

    Pixels scaled from ``0..16`` to ``[0, 1]``, flattened to 64 features;
    a stratified split.

    Args:
        test_fraction: fraction of the 1797 examples held out for test.
        seed: seed of the split.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``, float32 ``x``, int64 ``y``.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return (x_train, y_train), (x_test, y_test)


def standardize(x_train, x_test):
    """``(x - mean) / std`` per feature, with the mean and std of ``x_train`` (a constant feature: std 1).

    Args:
        x_train: ``(n, features)`` array; its statistics are used for both splits.
        x_test: ``(m, features)`` array.

    Returns:
        ``(x_train, x_test)`` standardized, float32.
    """
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((x_train - mean) / std).astype("float32"), ((x_test - mean) / std).astype("float32")


def synthetic_images(num_train, num_test, shape=(32, 32, 3), num_classes=10, noise=0.25, seed=0):
    """A random, learnable stand-in for an image dataset such as CIFAR-10.

    ``image = clip(prototype[label] + noise * N(0, 1))`` in ``[0, 1]``, stored as
    ``uint8`` like TFDS images; one smooth random prototype per class, labels
    drawn uniformly.

    Args:
        num_train, num_test: number of examples per split.
        shape: image shape ``(height, width, channels)``.
        num_classes: number of classes.
        noise: standard deviation of the per-pixel noise, in ``[0, 1]`` units.
        seed: seed of prototypes, labels and noise.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``, ``uint8`` images, ``int64`` labels.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(size=(num_classes, 4, 4, shape[2]))
    prototypes = np.kron(coarse, np.ones((1, shape[0] // 4, shape[1] // 4, 1)))

    def split(count):
        labels = rng.integers(0, num_classes, count)
        images = prototypes[labels] + noise * rng.normal(size=(count,) + tuple(shape))
        return np.round(255 * np.clip(images, 0, 1)).astype("uint8"), labels.astype("int64")

    return split(num_train), split(num_test)
