"""Train-step logs that Keras can reduce under ``MultiWorkerMirroredStrategy``.

Keras reduces what a train or test step returns with
``strategy.reduce("MEAN", value, axis=0)`` when several workers run, which
fails on the scalars every step returns ("Invalid reduction dimension 0",
keras-team/keras#20585). A step of this package returns each log with one
axis of length 1 then: the same reduction averages it over all replicas of
all workers and gives back a scalar.
"""

import tensorflow as tf


def in_multi_worker_mode(strategy):
    """Whether ``strategy`` is a ``MultiWorkerMirroredStrategy`` over more than one worker."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs if job in ("chief", "worker")) > 1


def reducible_logs(logs, strategy):
    """``logs`` as Keras' reduction under ``strategy`` accepts them (see above)."""
    if not in_multi_worker_mode(strategy):
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}
