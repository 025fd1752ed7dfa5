"""Worker processes for ``tf.distribute.MultiWorkerMirroredStrategy``, and a worker's role.

On real hosts each worker is started by hand (or by a scheduler) with its own
``TF_CONFIG``; :func:`tf_config` writes one. On one machine,
:class:`LocalCluster` starts ``N`` worker processes on free localhost ports,
each with its ``TF_CONFIG``, and waits for them with a timeout, killing the
others once one fails (after a grace period in which they should fail on
their own) and every process at the end::

    with LocalCluster([sys.executable, "train.py"], num_workers=2) as cluster:
        results = cluster.wait(timeout=300)
    assert all(r.returncode == 0 for r in results)

:func:`is_chief` tells a worker whether it writes checkpoints and prints.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import tensorflow as tf

from keras_gradops.arguments import check_positive, check_positive_int


def free_ports(count, host="localhost"):
    """``count`` TCP ports that were free on ``host`` a moment ago (the OS picks them)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(workers, index):
    """The ``TF_CONFIG`` dict of worker ``index`` in a cluster of ``workers`` (``"host:port"`` strings).

    Worker 0 is the chief. Example:
        >>> tf_config(["host1:12345", "host2:12345"], 1)
        {'cluster': {'worker': ['host1:12345', 'host2:12345']}, 'task': {'type': 'worker', 'index': 1}}
    """
    if not 0 <= index < len(workers):
        raise ValueError(f"`index` must be in [0, {len(workers)}). Received: index={index!r}")
    return {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}


def is_chief(strategy=None):
    """Whether this process is the chief: the ``chief`` task, else worker 0, else the only process.

    Args:
        strategy: a ``MultiWorkerMirroredStrategy``; default the current strategy
            (any other strategy runs in one process, which is the chief).
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


@dataclasses.dataclass
class WorkerResult:
    """How one worker process ended.

    Attributes:
        index: its task index.
        returncode: its exit code (negative: killed by that signal).
        output: what it wrote to stdout and stderr.
        seconds: from start to exit.
    """

    index: int
    returncode: int
    output: str
    seconds: float


class LocalCluster:
    """``num_workers`` processes running ``command`` on localhost, each with its ``TF_CONFIG``.

    Args:
        command: the argv list every worker runs.
        num_workers: how many workers (>= 1).
        env: extra environment variables for every worker.
        cwd: their working directory.
    """

    def __init__(self, command, num_workers, env=None, cwd=None):
        self.command = list(command)
        self.num_workers = check_positive_int(num_workers, "num_workers")
        self.env = dict(env or {})
        self.cwd = cwd
        self.addresses = [f"localhost:{port}" for port in free_ports(self.num_workers)]
        self._processes = []
        self._logs = []
        self._started = None
        self._ended = {}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        """Starts every worker, each in a process group of its own."""
        self._started = time.monotonic()
        for index in range(self.num_workers):
            env = {**os.environ, **self.env, "TF_CONFIG": json.dumps(tf_config(self.addresses, index))}
            log = tempfile.TemporaryFile(mode="w+")
            self._logs.append(log)
            self._processes.append(subprocess.Popen(
                self.command, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))

    def output(self, index):
        """What worker ``index`` has written so far (stdout and stderr)."""
        log = self._logs[index]
        log.flush()
        with open(f"/proc/self/fd/{log.fileno()}") as current:
            return current.read()

    def kill(self, index, sig=signal.SIGKILL):
        """Sends ``sig`` to worker ``index``'s process group."""
        _signal_group(self._processes[index], sig)

    def wait(self, timeout, failure_grace=60.0, echo=None):
        """Waits until every worker has exited; returns their :class:`WorkerResult` in task order.

        Args:
            timeout: seconds after which the remaining workers are killed.
            failure_grace: once a worker has failed, seconds the others get to
                exit on their own (their collectives should fail) before they
                are killed.
            echo: a worker index whose output is copied to this process's
                stdout as it arrives (e.g. ``0``, the chief's progress bar).

        Returns:
            A list of :class:`WorkerResult`; a killed worker has a negative
            ``returncode``.
        """
        check_positive(timeout, "timeout")
        deadline = self._started + timeout
        echoed = 0
        while len(self._ended) < self.num_workers:
            if echo is not None:
                text = self.output(echo)
                sys.stdout.write(text[echoed:])
                sys.stdout.flush()
                echoed = len(text)
            now = time.monotonic()
            for index, process in enumerate(self._processes):
                if index not in self._ended and process.poll() is not None:
                    self._ended[index] = now
            failed = [i for i in self._ended if self._processes[i].returncode != 0]
            if failed:
                deadline = min(deadline, min(self._ended[i] for i in failed) + failure_grace)
            if len(self._ended) < self.num_workers and now >= deadline:
                self.stop()
                continue
            time.sleep(0.05)
        if echo is not None:
            sys.stdout.write(self.output(echo)[echoed:])
        return [self._result(i) for i in range(self.num_workers)]

    def stop(self):
        """Kills every worker still running and reaps it."""
        for index, process in enumerate(self._processes):
            if process.poll() is None:
                _signal_group(process, signal.SIGKILL)
            process.wait()
            self._ended.setdefault(index, time.monotonic())

    def _result(self, index):
        return WorkerResult(index, self._processes[index].returncode, self.output(index),
                            self._ended[index] - self._started)


def _signal_group(process, sig):
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
