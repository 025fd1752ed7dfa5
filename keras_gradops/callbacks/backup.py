"""Back up and restore training across workers: only the chief writes, everyone restores.

Keras' ``BackupAndRestore`` has no notion of a chief: several workers of a
``MultiWorkerMirroredStrategy`` pointed at one directory write the same file
at once. :class:`MultiWorkerBackupAndRestore` follows TensorFlow's rule for
multi-worker checkpoints: the chief (:func:`keras_gradops.cluster.is_chief`)
writes ``backup_dir``; every worker restores from it when ``fit`` starts, so
``backup_dir`` must be storage every worker reads (a shared file system; one
machine's disk for workers on one machine). Weights are identical on every
worker after each synchronous step, so the chief's copy is everyone's.

Each backup is a directory ``epoch_<n>`` (``n`` epochs done) written under a
temporary name and renamed when complete, so a worker killed at any moment
leaves complete backups only; the newest one is restored.
"""

import os
import re
import shutil

import keras

from keras_gradops import keras_internals
from keras_gradops.arguments import check_bool
from keras_gradops.cluster import is_chief

WEIGHTS = "model.weights.h5"
_BACKUP = re.compile(r"^epoch_(\d+)$")


class MultiWorkerBackupAndRestore(keras.callbacks.Callback):
    """Saves the model (weights and optimizer state) at each epoch's end; a new ``fit`` resumes there.

    Training resumes at the start of the epoch after the newest backup, with
    the weights and optimizer variables of that moment: with the same data
    order per epoch, the resumed run's weights equal an uninterrupted run's.

    Args:
        backup_dir: the directory the chief writes and every worker reads.
        delete_checkpoint: delete the backups when ``fit`` completes.

    Example:
        >>> backup = MultiWorkerBackupAndRestore("/tmp/run1/backup")
        >>> # model.fit(dataset, epochs=10, callbacks=[backup])   # on every worker
    """

    def __init__(self, backup_dir, delete_checkpoint=True):
        super().__init__()
        if not isinstance(backup_dir, (str, os.PathLike)) or not os.fspath(backup_dir):
            raise ValueError(f"`backup_dir` must be a non-empty path. Received: backup_dir={backup_dir!r}")
        self.backup_dir = os.fspath(backup_dir)
        self.delete_checkpoint = check_bool(delete_checkpoint, "delete_checkpoint")

    def backups(self):
        """``{epochs done: directory}`` of the complete backups."""
        if not os.path.isdir(self.backup_dir):
            return {}
        found = {}
        for name in os.listdir(self.backup_dir):
            match = _BACKUP.match(name)
            if match:
                found[int(match.group(1))] = os.path.join(self.backup_dir, name)
        return found

    def on_train_begin(self, logs=None):
        backups = self.backups()
        if not backups:
            return
        if not self.model.built:
            raise ValueError("MultiWorkerBackupAndRestore restores into a built model: build it before `fit`.")
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        epochs_done = max(backups)
        self.model.load_weights(os.path.join(backups[epochs_done], WEIGHTS))
        keras_internals.set_initial_epoch(self.model, epochs_done)

    def on_epoch_end(self, epoch, logs=None):
        if not is_chief(self.model.distribute_strategy):
            return
        target = os.path.join(self.backup_dir, f"epoch_{epoch + 1}")
        partial = target + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        self.model.save_weights(os.path.join(partial, WEIGHTS))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)  # atomic: the backup appears complete or not at all
        for done, directory in self.backups().items():
            if done != epoch + 1:
                shutil.rmtree(directory, ignore_errors=True)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and is_chief(self.model.distribute_strategy):
            for directory in self.backups().values():
                shutil.rmtree(directory, ignore_errors=True)
