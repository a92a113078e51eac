"""How a clipengine process stops when asked to: SIGTERM as Ctrl-C, and child processes told in turn.

A scheduler (cron's timeout, Slurm, Kubernetes, ``kill``) stops a job with SIGTERM. Python's default ends
the process on the spot: no ``finally``, no cleanup of temporary folders, no last commit of finished
work. :func:`stop_on_sigterm` makes it raise :class:`~clipengine.errors.Terminated` (a
``KeyboardInterrupt``) in the main thread instead, so a command stops exactly as on Ctrl-C.
:func:`run_child` passes such a stop on to a child process and gives it time to clean up.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading

from clipengine.errors import Terminated

CHILD_GRACE_SECONDS = 30.0  # how long a stopped child may take to clean up before it is killed


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`~clipengine.errors.Terminated` in the main thread. For a process's
    own entry point (the ``clipengine`` command, a benchmark script), not for a library call: it replaces
    the process's SIGTERM handler. Outside the main thread it does nothing (only that thread can)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)


@contextlib.contextmanager
def kept_sigterm_handler():
    """Put back, on leaving, a SIGTERM handler the process installed itself (:func:`stop_on_sigterm`'s, or a
    caller's own) that the code inside replaced: ``ray.init`` installs one that exits on the spot
    (``sys.exit``), which would skip what a stop as on Ctrl-C does. The default disposition is left to the code
    inside."""
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if callable(previous) and signal.getsignal(signal.SIGTERM) is not previous:
            signal.signal(signal.SIGTERM, previous)


def run_child(command: list[str], grace_seconds: float = CHILD_GRACE_SECONDS) -> int:
    """Run ``command`` to its end; its exit code. Interrupted while it runs, this process passes the stop on:
    on :class:`~clipengine.errors.Terminated` the child gets SIGTERM; on Ctrl-C it has had SIGINT already
    from the terminal (one process group). Either way it gets ``grace_seconds`` to clean up before it is
    killed, and the interrupt then goes on in this process."""
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt as stop:
        if isinstance(stop, Terminated):
            process.terminate()
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
