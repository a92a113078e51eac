"""Stage: coverage of an operational design domain — t-way value combinations present, missing or thin.

- ``odd``: the ODD file (features, allowed values, excluded combinations), loaded as data.
- ``inputs``: a run directory (metadata ⋈ errors) or a table.
- ``stage``: :func:`~clipengine.coverage.stage.measure_coverage` (frame in, ``CoverageResult`` out), its
  outputs through :mod:`clipengine.artifacts` (``coverage.json``, ``coverage.parquet``) and
  :func:`~clipengine.coverage.stage.coverage_run`, the stage of ``clipengine run``; the counting is
  :mod:`clipengine.kernels.coverage`.
"""
