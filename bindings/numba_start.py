"""Numba's start-up without SciPy's linear algebra package.

The first cached kernel a process loads makes Numba import its NumPy implementations, and one of
them, ``numba.np.arraymath``, checks at import that BLAS is there by importing
``scipy.linalg.cython_blas``. Importing that name imports all of ``scipy.linalg`` first, and
through SciPy's array-API layer every lazily loaded NumPy submodule (``f2py``, ``testing``, ``ma``,
...): most of what a short ``clipengine slices`` run pays for Numba, for a check that needs the one
extension module.

:func:`prepare_numba` loads that extension module alone — found and executed by the import
system's own finder and loader, as ``import`` would — lets Numba run its check against it, then
takes the name out of ``sys.modules`` again, so the interpreter is left as an ordinary import of
``numba.np.arraymath`` leaves it: a later ``import scipy.linalg.cython_blas`` imports
``scipy.linalg`` and gets the same module object (a Cython module is created once per process).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

BLAS_MODULE = "scipy.linalg.cython_blas"
CHECKING_MODULE = "numba.np.arraymath"


def prepare_numba() -> bool:
    """Import ``numba.np.arraymath`` with ``scipy.linalg.cython_blas`` loaded on its own; True when
    that path was taken. Does nothing (False) when the check already ran, when ``scipy.linalg`` or
    the module is already imported (nothing to save), or when SciPy or the module cannot be found
    (Numba's own import then decides, as without this function)."""
    if CHECKING_MODULE in sys.modules or "scipy.linalg" in sys.modules or BLAS_MODULE in sys.modules:
        return False
    spec = _blas_spec()
    if spec is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[BLAS_MODULE] = module
    try:
        spec.loader.exec_module(module)
        import numba.np.arraymath  # noqa: F401  (runs the BLAS check against the module above)
    except Exception:
        return False
    finally:
        if sys.modules.get(BLAS_MODULE) is module:
            del sys.modules[BLAS_MODULE]
    return True


def _blas_spec() -> importlib.machinery.ModuleSpec | None:
    """The spec ``import scipy.linalg.cython_blas`` would use, found without importing ``scipy.linalg``."""
    try:
        scipy_spec = importlib.util.find_spec("scipy")
    except (ImportError, ValueError):
        return None
    if scipy_spec is None or not scipy_spec.submodule_search_locations:
        return None
    folders = [os.path.join(folder, "linalg") for folder in scipy_spec.submodule_search_locations]
    spec = importlib.machinery.PathFinder.find_spec(BLAS_MODULE, folders)
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return None
    return spec
