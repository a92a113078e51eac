"""Coverage of an operational design domain: t-way value combinations present, missing or thin.

:func:`measure_coverage` (frame in, :class:`CoverageResult` out) is the stage; :func:`load_odd`
reads the ODD file; :func:`read_coverage_input` reads a run directory or a table;
:func:`write_coverage` writes ``coverage.json`` / ``coverage.parquet``.
"""

from clipengine.coverage.inputs import read_coverage_input, read_run_table
from clipengine.coverage.odd import Odd, load_odd, parse_odd
from clipengine.coverage.stage import (
    COVERAGE_JSON,
    COVERAGE_PARQUET,
    CoverageResult,
    measure_coverage,
    write_coverage,
)

__all__ = [
    "COVERAGE_JSON",
    "COVERAGE_PARQUET",
    "CoverageResult",
    "Odd",
    "load_odd",
    "measure_coverage",
    "parse_odd",
    "read_coverage_input",
    "read_run_table",
    "write_coverage",
]
