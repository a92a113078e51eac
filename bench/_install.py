"""clipengine as installed, for whole-process timings: its modules' bytecode compiled ahead, as ``pip install``
compiles a wheel's modules.

A source checkout imported with ``PYTHONDONTWRITEBYTECODE`` set (as in some containers) compiles every
clipengine module from source in every process, which an installed copy never does; the peers' packages
were compiled when pip installed them. Python reads existing bytecode whatever that variable says.
"""

from __future__ import annotations

import compileall
from pathlib import Path

PACKAGE_FOLDERS = ("engine", "kernels", "bindings", "bench")  # the folders the clipengine namespace maps


def compile_clipengine() -> None:
    """Write the bytecode of every clipengine module next to its source (``__pycache__``), quietly."""
    root = Path(__file__).resolve().parent.parent
    for folder in PACKAGE_FOLDERS:
        if (root / folder).is_dir():
            compileall.compile_dir(str(root / folder), quiet=1)
