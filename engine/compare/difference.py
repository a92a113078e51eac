"""The change of a slice's mean error between two runs: difference, 95 % interval, two-sided p-value.

A slice holds ``n_old`` items in the old run and ``n_new`` in the new one; ``n_matched`` of them
are the same items (same key) in both. Which test fits depends on that overlap:

| errors | the same items in both (``n_matched = n_old = n_new``) | no item in common | some in common |
| --- | --- | --- | --- |
| 0/1 | McNemar's test, exact mid-p (binomial on the items that flipped); Newcombe's paired square-and-add interval | Fisher's exact test; Newcombe's hybrid score interval (from Wilson intervals) | partially-overlapping-samples t (normal approximation) |
| other | paired t | Welch | partially-overlapping-samples t |

The paired 0/1 test is the mid-p version of the exact conditional McNemar test: the exact test
is markedly conservative (with 48 flips split 34/14 it gives p = 0.0055 where the mid-p gives
0.0038); Fagerland, Lydersen & Laake (BMC Med. Res. Methodol. 13:91, 2013) found that the mid-p
test did not exceed the nominal level in any of the 9,595 scenarios they studied, and recommend
it. The null simulations in ``tests/engine/compare`` check the whole comparison's false alarms.

The partially-overlapping-samples t (Derrick, Toher & White 2017, their T_new2) uses the variance
of the difference of the two means with the covariance of the matched items taken out, and a
degrees-of-freedom formula that gives the paired t's ``n - 1`` with full overlap and Welch's
without any; it reduces to those two tests at the ends. Everything is vectorized over slices:
the inputs are per-slice sums (:class:`SliceSums`), the outputs ``(S,)`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipengine.slices.stats import DEFAULT_CONFIDENCE, wilson_interval

TEST_MCNEMAR = "mcnemar-mid-p"
TEST_FISHER = "fisher-exact"
TEST_PAIRED_T = "paired-t"
TEST_WELCH = "welch"
TEST_OVERLAP = "partial-overlap-t"


@dataclass
class SliceSums:
    """Sufficient statistics of ``S`` slices in two runs, each field ``(S,)`` float64.

    ``n_*``, ``sum_*``, ``sq_*``: item count, sum and sum of squares of the errors of the slice's
    items in the old and the new run; ``matched_*``: the same over the items in the slice in both
    runs (``matched_old``/``matched_new`` their old/new error sums, ``matched_sq_*`` the sums of
    squares, ``matched_cross`` Σ old·new).
    """

    n_old: np.ndarray
    sum_old: np.ndarray
    sq_old: np.ndarray
    n_new: np.ndarray
    sum_new: np.ndarray
    sq_new: np.ndarray
    n_matched: np.ndarray
    matched_old: np.ndarray
    matched_new: np.ndarray
    matched_sq_old: np.ndarray
    matched_sq_new: np.ndarray
    matched_cross: np.ndarray

    @classmethod
    def unpaired(cls, n_old, sum_old, sq_old, n_new, sum_new, sq_new) -> "SliceSums":
        """Two samples with no item in common."""
        arrays = [np.asarray(a, dtype=np.float64) for a in (n_old, sum_old, sq_old, n_new, sum_new, sq_new)]
        zero = np.zeros_like(arrays[0])
        return cls(*arrays, zero, zero, zero, zero, zero, zero)


@dataclass
class Differences:
    """Per slice: ``diff`` = new mean − old mean, its interval, the two-sided p-value and the test's name."""

    diff: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    test: list[str]


def mcnemar_mid_p(flipped_up, flipped_down) -> np.ndarray:
    """Two-sided McNemar mid-p value from the discordant counts: items 0 → 1 and items 1 → 0.
    Under no change each discordant item is equally likely to have flipped either way; with
    ``B ~ Binomial(up + down, 1/2)`` and ``k = min(up, down)``: ``2·P(B ≤ k) − P(B = k)`` (the exact
    conditional p-value less the probability of the observed split), and ``1 − P(B = k)/2`` for an
    even split (Fagerland et al. 2013); 1 with no flip."""
    from scipy.stats import binom

    up = np.rint(np.asarray(flipped_up, dtype=np.float64))
    down = np.rint(np.asarray(flipped_down, dtype=np.float64))
    total = up + down
    low = np.minimum(up, down)
    point = binom.pmf(low, total, 0.5)
    p = np.where(up == down, 1.0 - point / 2, 2.0 * binom.cdf(low, total, 0.5) - point)
    return np.where(total > 0, np.clip(p, 0.0, 1.0), 1.0)


def newcombe_unpaired_interval(x_old, n_old, x_new, n_new, confidence: float = DEFAULT_CONFIDENCE):
    """Newcombe's hybrid score interval (his method 10, 1998) of ``p_new − p_old`` for two
    independent proportions, built from the Wilson interval of each: ``(low, high)``, ``(S,)``."""
    x_old, n_old, x_new, n_new = (np.asarray(a, dtype=np.float64) for a in (x_old, n_old, x_new, n_new))
    l1, u1 = wilson_interval(x_old, n_old, confidence)
    l2, u2 = wilson_interval(x_new, n_new, confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        p1, p2 = x_old / n_old, x_new / n_new
        diff = p2 - p1
        low = diff - np.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
        high = diff + np.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return low, high


def newcombe_paired_interval(both, up, down, neither, confidence: float = DEFAULT_CONFIDENCE):
    """Newcombe's square-and-add interval (his method 10, 1998) of ``p_new − p_old`` for paired 0/1
    outcomes: ``both`` items with an error in both runs, ``up`` 0 → 1, ``down`` 1 → 0, ``neither``.
    The Wilson intervals of the two margins are combined with the correlation of the table, whose
    numerator ``ad − bc`` is continuity-corrected as Newcombe does: less ``n/2`` when above ``n/2``,
    0 between 0 and ``n/2``, kept when negative."""
    a, b, c, d = (np.asarray(v, dtype=np.float64) for v in (both, up, down, neither))
    n = a + b + c + d
    new_errors, old_errors = a + b, a + c
    l1, u1 = wilson_interval(new_errors, n, confidence)
    l2, u2 = wilson_interval(old_errors, n, confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        p1, p2 = new_errors / n, old_errors / n
        margins = (a + b) * (c + d) * (a + c) * (b + d)
        cross = a * d - b * c
        cross = np.where(cross > n / 2, cross - n / 2, np.where(cross >= 0, 0.0, cross))
        phi = np.where(margins > 0, cross / np.sqrt(np.where(margins > 0, margins, 1.0)), 0.0)
        diff = (b - c) / n
        below = np.sqrt(np.maximum((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
        above = np.sqrt(np.maximum((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return diff - below, diff + above


def overlap_t(sums: SliceSums, confidence: float = DEFAULT_CONFIDENCE):
    """The partially-overlapping-samples t (paired t and Welch at its ends): ``(diff, low, high, p)``.

    ``var(m_new − m_old) = v_old/n_old + v_new/n_new − 2·n_matched·cov/(n_old·n_new)``, with ``cov`` the
    sample covariance of the matched items' old and new errors; degrees of freedom
    ``(n_c − 1) + (γ − n_c + 1)·(n_a + n_b)/(n_a + n_b + 2 n_c)`` (γ Welch's, ``n_c`` matched, ``n_a``,
    ``n_b`` unmatched). Where a variance cannot be estimated (fewer than 2 items) the p-value is 1 and
    the interval NaN; where the difference has no spread at all it is certain (p 0) or nil (p 1).
    """
    from scipy.stats import t

    s = sums
    n1, n2, nc = s.n_old, s.n_new, s.n_matched
    with np.errstate(invalid="ignore", divide="ignore"):
        m1, m2 = s.sum_old / n1, s.sum_new / n2
        diff = m2 - m1
        v1 = np.maximum((s.sq_old - n1 * m1 * m1) / (n1 - 1), 0.0)
        v2 = np.maximum((s.sq_new - n2 * m2 * m2) / (n2 - 1), 0.0)
        cov = np.where(nc >= 2, (s.matched_cross - s.matched_old * s.matched_new / nc) / (nc - 1), 0.0)
        w1, w2 = v1 / n1, v2 / n2
        var = np.maximum(w1 + w2 - 2 * nc * cov / (n1 * n2), 0.0)
        welch_df = (w1 + w2) ** 2 / (w1 * w1 / (n1 - 1) + w2 * w2 / (n2 - 1))
        unmatched = (n1 - nc) + (n2 - nc)
        df = np.where(unmatched > 0, (nc - 1) + (welch_df - nc + 1) * unmatched / (unmatched + 2 * nc), nc - 1)
        se = np.sqrt(var)
        p = 2 * t.sf(np.abs(diff) / se, df)
        half = t.ppf(0.5 + confidence / 2, df) * se
    estimable = (n1 >= 2) & (n2 >= 2) & np.isfinite(df) & (df >= 1)
    # variances from sums carry rounding noise (~1e-8 of the mean in the standard error) where all
    # errors are alike
    no_spread = estimable & (se <= 1e-7 * np.maximum(np.abs(m1), np.abs(m2)))
    p = np.where(no_spread, np.where(diff != 0, 0.0, 1.0), p)
    half = np.where(no_spread, 0.0, half)
    p = np.where(estimable, p, 1.0)
    half = np.where(estimable, half, np.nan)
    return diff, diff - half, diff + half, np.clip(np.nan_to_num(p, nan=1.0), 0.0, 1.0)


def compare_means(sums: SliceSums, *, binary: bool, confidence: float = DEFAULT_CONFIDENCE) -> Differences:
    """The difference new − old of each slice's mean error with its interval and two-sided p-value,
    by the test that fits its overlap (see the module's table). Slices must hold items in both runs."""
    s = sums
    if np.any(s.n_old <= 0) or np.any(s.n_new <= 0):
        raise ValueError("compare_means: every slice needs items in both runs")
    paired = (s.n_matched == s.n_old) & (s.n_matched == s.n_new)
    disjoint = s.n_matched == 0
    diff, low, high, p = overlap_t(s, confidence)
    if binary:
        from clipengine.kernels.fisher import fisher_exact_two_sided

        both = s.matched_cross
        up = s.matched_new - both  # 0 in the old run, 1 in the new
        down = s.matched_old - both
        neither = s.n_matched - both - up - down
        p_pair = mcnemar_mid_p(up, down)
        low_pair, high_pair = newcombe_paired_interval(both, up, down, neither, confidence)
        p_fisher = fisher_exact_two_sided(s.sum_old, s.n_old, s.sum_new, s.n_new)
        low_fisher, high_fisher = newcombe_unpaired_interval(s.sum_old, s.n_old, s.sum_new, s.n_new, confidence)
        p = np.where(paired, p_pair, np.where(disjoint, p_fisher, p))
        low = np.where(paired, low_pair, np.where(disjoint, low_fisher, low))
        high = np.where(paired, high_pair, np.where(disjoint, high_fisher, high))
        names = (TEST_MCNEMAR, TEST_FISHER)
    else:
        names = (TEST_PAIRED_T, TEST_WELCH)
    test = [names[0] if a else names[1] if b else TEST_OVERLAP for a, b in zip(paired.tolist(), disjoint.tolist())]
    return Differences(diff, low, high, p, test)
