"""SIGTERM as Ctrl-C, and a stopped process stopping its child (clipengine.interrupts)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

_CHILD = textwrap.dedent(
    """
    import tempfile, time
    from clipengine.interrupts import stop_on_sigterm

    stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="clipengine-child-") as scratch:
        print(scratch, flush=True)
        time.sleep(120)
    """
)

_PARENT = textwrap.dedent(
    """
    import sys
    from clipengine.errors import Terminated
    from clipengine.interrupts import run_child, stop_on_sigterm

    stop_on_sigterm()
    try:
        run_child([sys.executable, "-c", sys.argv[1]], grace_seconds=float(sys.argv[2]))
    except Terminated:
        print("PARENT TERMINATED", flush=True)
    """
)


def test_a_terminated_parent_stops_its_child_which_cleans_up():
    """The child gets SIGTERM from its parent (not the parent's whole group), so its temporary folder is
    removed; a child killed after the grace period would leave it behind."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, "20"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    scratch = Path(parent.stdout.readline().strip())
    assert scratch.name.startswith("clipengine-child-") and scratch.is_dir()
    started = time.monotonic()
    parent.send_signal(signal.SIGTERM)
    rest, _ = parent.communicate(timeout=90)
    assert "PARENT TERMINATED" in rest and parent.returncode == 0
    assert time.monotonic() - started < 15, "the child was not told: the parent waited out the grace period"
    assert not scratch.exists()


def test_stop_on_sigterm_is_left_alone_outside_the_main_thread():
    code = textwrap.dedent(
        """
        import signal, threading
        from clipengine.interrupts import stop_on_sigterm

        errors = []

        def install():
            try:
                stop_on_sigterm()
            except Exception as error:  # signal.signal refuses any thread but the main one
                errors.append(error)

        worker = threading.Thread(target=install)
        worker.start(); worker.join()
        print(not errors and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        stop_on_sigterm()
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_a_handler_the_process_installed_is_put_back_and_the_default_left_alone():
    from clipengine.interrupts import kept_sigterm_handler

    def own(signum, frame):
        pass

    def replacement(signum, frame):
        pass

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, own)
        with kept_sigterm_handler():
            signal.signal(signal.SIGTERM, replacement)
        assert signal.getsignal(signal.SIGTERM) is own
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with kept_sigterm_handler():
            signal.signal(signal.SIGTERM, replacement)
        assert signal.getsignal(signal.SIGTERM) is replacement
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.ray
def test_connecting_to_ray_keeps_the_stop_as_on_ctrl_c():
    """ray.init installs a SIGTERM handler that exits on the spot; the Ray executor puts the CLI's back."""
    pytest.importorskip("ray")
    code = textwrap.dedent(
        """
        import signal
        import ray
        from clipengine.executors.ray import _connected
        from clipengine.interrupts import stop_on_sigterm

        stop_on_sigterm()
        ours = signal.getsignal(signal.SIGTERM)
        with _connected(ray, None):
            print("KEPT", signal.getsignal(signal.SIGTERM) is ours, flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_num_cpus": "1"})
    assert "KEPT True" in done.stdout, done.stderr[-2000:]
