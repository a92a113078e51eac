"""Stage 5, compare: a run against a baseline run — slices that got worse or better, new or gone,
the items whose errors changed, and the drift of the data.

- ``difference``: the change of a slice's mean error between two runs (paired, unpaired, partly paired).
- ``family``: the compared slices, each with one definition for both runs (the old run's bins).
- ``drift``: per attribute, χ² test and population stability index of its label distribution.
- ``stage``: ``compare_runs`` / ``compare_sides`` → :class:`~clipengine.compare.stage.Comparison`, ``write_comparison``.
"""
