"""Stage 3, slices: metadata ⋈ errors → the top-K weak slices with statistics a user can trust.

- ``coding``: feature typing and binning (numeric bin edges kept with the slices).
- ``find``: ``find_slices``, the Polars front end of the SliceLine kernel (:mod:`clipengine.kernels.sliceline`).
- ``stats``: intervals, exact tests, Benjamini–Hochberg over a family, selection-adjusted intervals.
- ``corrected``: a slice's true group (size, error rate, interval) from a labelled sample (PPI).
- ``explain``: the sentences the summary and the report say about the family and the labels.
"""
