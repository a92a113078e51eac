"""User-facing errors: one line, naming the file or field, never a traceback."""

from __future__ import annotations


class ClipengineError(Exception):
    """An error caused by input or configuration; the CLI prints ``str(error)`` alone."""


class MissingDependencyError(ClipengineError):
    """An optional package is needed for the requested feature."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = ""):
        hint = f"pip install 'clipengine[{extra}]'" if extra else f"pip install {package}"
        what = f" for {purpose}" if purpose else ""
        super().__init__(f"the package '{package}' is needed{what}; install it with: {hint}")
        self.package = package


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``kill``), raised in the process's main thread by the handler that
    :func:`clipengine.interrupts.stop_on_sigterm` installs (the ``clipengine`` command, the benchmark
    scripts). A ``KeyboardInterrupt``, so everything that keeps finished work or cleans up on Ctrl-C does the
    same on SIGTERM."""
