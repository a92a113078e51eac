"""Agreement with the PyPI ``sliceline`` package on Adult (compat mode reproduces its semantics)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clipengine.slices.coding import code_features
from clipengine.slices.find import find_slices

from tests.shared_data import SLICELINE_DATA

DATA = SLICELINE_DATA


def adult_frame() -> pl.DataFrame:
    if not (DATA / "adult_train.csv").exists():
        pytest.skip(f"Adult data not found at {DATA}")
    frame = pl.read_csv(DATA / "adult_train.csv").with_columns(pl.col(pl.String).str.strip_chars())
    frame = frame.with_columns(
        pl.col(c).cast(pl.Int64) for c in frame.columns
        if frame[c].dtype == pl.String and frame[c].cast(pl.Int64, strict=False).null_count() == 0
    )
    # errors: a plain rule-based classifier of the income label (deterministic, no training)
    guess = (frame["education-num"] >= 13) & (frame["marital-status"] == "Married-civ-spouse")
    wrong = guess != frame["income"].str.contains(">50K")
    return frame.drop("income").with_columns(error=wrong.cast(pl.Int64))


@pytest.mark.parametrize(
    "min_sup, max_level",
    [(326, 2), pytest.param(32, 3, marks=pytest.mark.slow)],
)
def test_compat_mode_agrees_with_pypi_sliceline_on_adult(min_sup, max_level):
    sliceline = pytest.importorskip("sliceline")
    frame = adult_frame()
    features = [c for c in frame.columns if c != "error"]
    result = find_slices(frame, error="error", features=features, k=10, alpha=0.95, min_sup=min_sup,
                         max_level=max_level, compat="systemds")
    used, coded, _ = code_features(frame, features)
    codes = np.column_stack([c.codes for c in coded])
    labels = [c.labels for c in coded]
    finder = sliceline.Slicefinder(alpha=0.95, k=10, max_l=max_level, min_sup=min_sup)
    finder.fit(codes, frame["error"].to_numpy().astype(float))
    peer = np.array([[s["slice_score"], s["sum_slice_error"], s["max_slice_error"], s["slice_size"]]
                     for s in finder.top_slices_statistics_])[:10]
    ours = np.column_stack([result.score, result.error_sum, result.max_error, result.size])
    np.testing.assert_allclose(ours, peer, rtol=1e-9)
    kth = ours[-1, 0]
    peer_slices = {
        frozenset((used[j], labels[j][int(v)]) for j, v in enumerate(row) if v is not None)
        for row, stats in zip(finder.top_slices_, peer) if stats[0] > kth + 1e-12
    }
    our_slices = {frozenset(p.items()) for p, s in zip(result.predicates, result.score) if s > kth + 1e-12}
    assert our_slices == peer_slices
