"""Test session setup: two logical CPU devices for tf.distribute tests.

Logical devices must be configured before TensorFlow initialises its
runtime, so this runs at collection time, before any test module touches TF.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def two_replica_strategy():
    """One MirroredStrategy over the two logical CPU devices, shared by all tests.

    Separate MirroredStrategy objects in one process reuse collective keys, so
    all-reduces of different shapes from different tests would collide.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def mixed_float16():
    """The global dtype policy ``mixed_float16`` for one test, ``float32`` after it."""
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")
