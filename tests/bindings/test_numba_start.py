"""Numba's start-up without scipy.linalg (clipengine.bindings.numba_start), each case in a fresh interpreter."""

import subprocess
import sys


def _run(code: str) -> list[str]:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.split("\n")


def test_numba_starts_without_scipy_linalg_and_leaves_the_imports_as_they_were():
    lines = _run(
        "import sys\n"
        "from clipengine.bindings.numba_start import BLAS_MODULE, prepare_numba\n"
        "print('prepared', prepare_numba())\n"
        "import numba.np.arraymath\n"
        "print('blas', numba.np.arraymath._HAVE_BLAS)\n"
        "print('imported', 'scipy.linalg' in sys.modules, BLAS_MODULE in sys.modules)\n"
        "print('again', prepare_numba())\n"
        # a later import gets scipy.linalg and the module, and Numba's BLAS calls go through it
        "import numpy as np, scipy.linalg, scipy.linalg.cython_blas\n"
        "from numba import njit\n"
        "x = np.arange(5.0)\n"
        "print('dot', njit(lambda a, b: np.dot(a, b))(x, x), float(scipy.linalg.blas.ddot(x, x)))\n"
        "print('same', scipy.linalg.cython_blas is sys.modules[BLAS_MODULE])\n"
    )
    assert lines[:6] == ["prepared True", "blas True", "imported False False", "again False", "dot 30.0 30.0",
                         "same True"]


def test_nothing_is_done_once_scipy_linalg_is_imported():
    lines = _run("import scipy.linalg\n"
                 "from clipengine.bindings.numba_start import prepare_numba\n"
                 "print(prepare_numba())\n")
    assert lines[0] == "False"
