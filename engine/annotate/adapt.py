"""Few-shot adaptation from a labelled sample: per attribute, whether and how to combine the schema's
zero-shot classifier with the labelled image embeddings, chosen by cross-validation on the labels.

For each attribute with labels (``LabelSet.truth``), the candidates are zero-shot itself and, for each
method of :data:`METHODS` (closed-form fits in :mod:`clipengine.kernels.fewshot`), the blends
``zs(x) + α·s·adapter(x)`` for α in :data:`ALPHAS` plus the adapter alone; ``s`` scales the adapter's
logits to the zero-shot logits' spread on the fitting items, so one α grid serves every method and
model (Tip-Adapter's β from :data:`TIP_BETAS`). Each candidate is scored by stratified
:data:`N_FOLDS`-fold cross-validation on the labelled items only, repeated :data:`CV_REPEATS` times on
different folds (the choice among many close candidates is less at the mercy of one split), every
item weighted by its inverse inclusion probability. ``auto`` adopts the best candidate only when it beats zero-shot by more than
one standard error of the paired per-item difference; otherwise the attribute stays zero-shot.
An explicit method takes its best α (and β) whatever zero-shot scores.

The choice is then re-made inside an outer cross-validation (nested), so every labelled item also
gets the label the served classifier would have given it without having seen it
(``served_predictions``): what ``clipengine eval --labels`` measures, never the fitted items themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from clipengine.devices import single_threaded_blas
from clipengine.errors import ClipengineError
from clipengine.kernels import fewshot

ZERO_SHOT = "zero-shot"
METHODS = ("prototype", "gda", "tip")
ADAPT_CHOICES = ("auto", "none", *METHODS)
ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)  # adapter weight relative to the zero-shot logits' spread
ADAPTER_ONLY = None  # the α of "the adapter alone, zero-shot left out"
TIP_BETAS = (1.0, 5.5, 20.0)  # Tip-Adapter's sharpness; 5.5 is the authors' default
N_FOLDS = 5
CV_REPEATS = 2
MIN_LABELS = 4  # fewer labelled items than this (or a single labelled class): no adaptation
SEED = 0  # folds are deterministic: the same labels give the same choice


@dataclass(frozen=True)
class Candidate:
    """One classifier to try: ``method`` (zero-shot or one of :data:`METHODS`), ``alpha`` (None: the
    adapter alone) and ``beta`` (tip)."""

    method: str
    alpha: float | None = None
    beta: float | None = None

    def describe(self) -> str:
        if self.method == ZERO_SHOT:
            return ZERO_SHOT
        blend = "alone" if self.alpha is None else f"α={self.alpha:g}"
        return f"{self.method} ({blend}{f', β={self.beta:g}' if self.beta is not None else ''})"


@dataclass
class Choice:
    """The outcome of cross-validation on one set of labelled items."""

    candidate: Candidate
    accuracy: float  # weighted CV accuracy of ``candidate`` (zero-shot: its plain accuracy)
    zero_shot_accuracy: float
    gain_se: float  # standard error of the paired accuracy difference to zero-shot (0 for zero-shot)
    reason: str


@dataclass
class AttributeAdaptation:
    """What adaptation did for one attribute (the record goes to metadata.parquet and the manifest)."""

    attribute: str
    requested: str
    candidate: Candidate
    n_labels: int
    zero_shot_accuracy: float | None
    cv_accuracy: float | None
    reason: str
    rows: np.ndarray  # (n,) int64: labelled items (positions into the run's items)
    truth: np.ndarray  # (n,) int64 class indices
    weights: np.ndarray  # (n,) float64 inverse inclusion probabilities
    zero_shot_predictions: np.ndarray  # (n,) int64
    served_predictions: np.ndarray  # (n,) int64: out-of-fold for an adapted attribute
    contribution: dict = field(default_factory=dict)  # the fitted pieces (see _fit_contribution)

    @property
    def method(self) -> str:
        return self.candidate.method

    @property
    def adapted(self) -> bool:
        return self.candidate.method != ZERO_SHOT

    def record(self) -> dict:
        return {
            "method": self.method,
            "requested": self.requested,
            "alpha": self.candidate.alpha if self.adapted else None,
            "beta": self.candidate.beta,
            "adapter_only": self.adapted and self.candidate.alpha is None,
            "n_labels": self.n_labels,
            "cv_accuracy": _rounded(self.cv_accuracy),
            "zero_shot_accuracy": _rounded(self.zero_shot_accuracy),
            "reason": self.reason,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


# ---- cross-validation ---------------------------------------------------------------------------
def _weighted_accuracy(correct: np.ndarray, weights: np.ndarray) -> float:
    return float(np.sum(weights * correct) / np.sum(weights))


def _paired_se(diff: np.ndarray, weights: np.ndarray) -> float:
    total = weights.sum()
    mean = np.sum(weights * diff) / total
    return float(np.sqrt(np.sum((weights * (diff - mean)) ** 2)) / total)


def _spread(logits: np.ndarray) -> float:
    centred = logits - logits.mean(axis=1, keepdims=True)
    return float(np.sqrt(np.mean(centred * centred)))


def _adapter(method: str, features, labels, weights, n_classes, scale, beta=None):
    """A function (n, D) → (n, C) adapter logits, fitted on the given items."""
    if method == "prototype":
        prototypes, has = fewshot.fit_prototypes(features, labels, n_classes, weights)
        return lambda x: fewshot.prototype_logits(x, prototypes, has, scale)
    if method == "gda":
        weight_rows, bias, has = fewshot.fit_gda(features, labels, n_classes, weights)
        return lambda x: fewshot.gda_logits(x, weight_rows, bias, has)
    if method == "tip":
        values = fewshot.tip_values(labels, n_classes)
        cache = np.asarray(features, np.float64)
        return lambda x: fewshot.tip_logits(x, cache, values, beta)
    raise ValueError(f"unknown adaptation method {method!r}")


def _candidates(methods) -> list[Candidate]:
    out = []
    for method in methods:
        for beta in (TIP_BETAS if method == "tip" else (None,)):
            out += [Candidate(method, alpha, beta) for alpha in (*ALPHAS, ADAPTER_ONLY)]
    return out


def _fold_predictions(methods, features, labels, weights, zero_shot, test_features, test_zero_shot, n_classes,
                      scale) -> np.ndarray:
    """(candidates, m) labels every candidate of ``methods`` (fitted on the given items) gives the m test
    items, in :func:`_candidates`' order; the α grid evaluated at once."""
    alphas = np.asarray(ALPHAS)
    zs_spread = _spread(zero_shot)
    blocks = []
    for method in methods:
        if method == "tip":  # one similarity matrix for every β
            values = fewshot.tip_values(labels, n_classes)
            sims_fit = np.asarray(features, np.float64) @ np.asarray(features, np.float64).T
            sims_test = np.asarray(test_features, np.float64) @ np.asarray(features, np.float64).T
            pairs = [(np.exp(-beta * (1.0 - sims_fit)) @ values, np.exp(-beta * (1.0 - sims_test)) @ values)
                     for beta in TIP_BETAS]
        else:
            adapter = _adapter(method, features, labels, weights, n_classes, scale)
            pairs = [(adapter(features), adapter(test_features))]
        for fitted, held_out in pairs:
            spread = _spread(fitted)
            factor = zs_spread / spread if spread > 0 else 1.0
            blends = test_zero_shot[None] + (alphas * factor)[:, None, None] * held_out[None]  # (α, m, C)
            blocks += [blends.argmax(axis=2), held_out.argmax(axis=1)[None]]
    return np.concatenate(blocks)


def _blend(zero_shot: np.ndarray, adapter: np.ndarray, factor: float, alpha: float | None) -> np.ndarray:
    return adapter if alpha is None else zero_shot + alpha * factor * adapter


def _scale_factor(zero_shot: np.ndarray, adapter: np.ndarray) -> float:
    spread = _spread(adapter)
    return _spread(zero_shot) / spread if spread > 0 else 1.0


def choose(features: np.ndarray, labels: np.ndarray, weights: np.ndarray, zero_shot: np.ndarray, n_classes: int,
           scale: float, requested: str, *, seed: int = SEED) -> Choice:
    """Cross-validate the candidates of ``requested`` (``auto`` or a method) on (n, D) ``features`` with
    class ``labels`` (n,), ``weights`` (n,) and zero-shot logits (n, C); the :class:`Choice`."""
    zs_correct = (zero_shot.argmax(axis=1) == labels).astype(np.float64)
    zs_accuracy = _weighted_accuracy(zs_correct, weights)
    keep = Choice(Candidate(ZERO_SHOT), zs_accuracy, zs_accuracy, 0.0, "")
    n, classes_seen = len(labels), len(np.unique(labels))
    if n < MIN_LABELS or classes_seen < 2:
        keep.reason = (f"kept zero-shot: {n} labelled item{'s' if n != 1 else ''} of {classes_seen} "
                       f"class{'es' if classes_seen != 1 else ''}; adaptation needs {MIN_LABELS} of two classes or more")
        return keep
    methods = METHODS if requested == "auto" else (requested,)
    candidates = _candidates(methods)  # blocks of len(ALPHAS) + 1 per (method, β), in _fold_predictions' order
    correct = np.zeros((len(candidates), n))  # share of repeats that got each item right
    for repeat in range(CV_REPEATS):
        folds = fewshot.stratified_folds(labels, min(N_FOLDS, n), seed + 1000 * repeat)
        for fold in range(folds.max() + 1):
            test, train = folds == fold, folds != fold
            predicted = _fold_predictions(methods, features[train], labels[train], weights[train], zero_shot[train],
                                          features[test], zero_shot[test], n_classes, scale)
            correct[:, test] += (predicted == labels[test]) / CV_REPEATS
    correct = dict(zip(candidates, correct))
    # ties (to rounding): the earlier candidate (smaller α, simpler method)
    scored = [(round(_weighted_accuracy(correct[c], weights), 9), -i, c) for i, c in enumerate(candidates)]
    _, _, best = max(scored)
    accuracy = _weighted_accuracy(correct[best], weights)
    se = _paired_se(correct[best] - zs_correct, weights)
    if requested != "auto":
        return Choice(best, accuracy, zs_accuracy, se, f"{requested} as asked: cross-validated accuracy "
                                                         f"{accuracy:.3f} vs zero-shot {zs_accuracy:.3f}")
    if accuracy - zs_accuracy > se:
        return Choice(best, accuracy, zs_accuracy, se, f"{best.describe()}: cross-validated accuracy {accuracy:.3f} "
                                                       f"beats zero-shot {zs_accuracy:.3f} by more than its standard "
                                                       f"error {se:.3f}")
    keep.gain_se = se
    keep.reason = (f"kept zero-shot: the best adaptation, {best.describe()}, reaches {accuracy:.3f} against "
                   f"{zs_accuracy:.3f}, not more than one standard error ({se:.3f}) better")
    return keep


def predict(candidate: Candidate, features, labels, weights, zero_shot_fit, n_classes, scale, new_features,
            zero_shot_new) -> np.ndarray:
    """(m,) class indices that ``candidate``, fitted on the given items, gives ``new_features`` (m, D)."""
    if candidate.method == ZERO_SHOT:
        return zero_shot_new.argmax(axis=1)
    adapter = _adapter(candidate.method, features, labels, weights, n_classes, scale, candidate.beta)
    factor = _scale_factor(zero_shot_fit, adapter(features))
    return _blend(zero_shot_new, adapter(new_features), factor, candidate.alpha).argmax(axis=1)


def out_of_fold(features, labels, weights, zero_shot, n_classes, scale, requested: str, *,
                seed: int = SEED + 1) -> np.ndarray:
    """(n,) the served classifier's label of each labelled item when that item was left out of both
    the choice and the fit (nested cross-validation)."""
    n = len(labels)
    if n < 2:
        return zero_shot.argmax(axis=1)
    predicted = np.empty(n, np.int64)
    folds = fewshot.stratified_folds(labels, min(N_FOLDS, n), seed)
    for fold in range(folds.max() + 1):
        test, train = folds == fold, folds != fold
        inner = choose(features[train], labels[train], weights[train], zero_shot[train], n_classes, scale, requested)
        predicted[test] = predict(inner.candidate, features[train], labels[train], weights[train], zero_shot[train],
                                  n_classes, scale, features[test], zero_shot[test])
    return predicted


# ---- all attributes ---------------------------------------------------------------------------------
def adapt_attributes(embeddings: np.ndarray, schema, side, scale: float, labels, requested: str
                     ) -> dict[str, AttributeAdaptation]:
    """Per attribute of ``schema`` that ``labels`` (a LabelSet) labels: the choice, its fitted pieces and
    the zero-shot and out-of-fold predictions on its labelled items. ``side``: the schema's
    ``ClassSide``; ``embeddings`` (N, D) the run's items (the labelled rows are read, nothing else)."""
    if requested not in ADAPT_CHOICES:
        raise ClipengineError(f"--adapt {requested!r}: expected one of {', '.join(ADAPT_CHOICES)}")
    with single_threaded_blas():
        return _adapt_attributes(embeddings, schema, side, scale, labels, requested)


def _adapt_attributes(embeddings, schema, side, scale, labels, requested):
    out = {}
    for a, attribute in enumerate(schema.attributes):
        if attribute.name not in labels.truth:
            continue
        labelled = labels.labelled(attribute.name)
        if not labelled.any():
            continue
        rows = labels.rows[labelled]
        index = {name: i for i, name in enumerate(attribute.class_names)}
        truth = np.asarray([index[v] for v in labels.truth[attribute.name][labelled]], np.int64)
        weights = labels.weights()[labelled]
        features = np.asarray(embeddings[np.sort(rows)], np.float64)[np.argsort(np.argsort(rows))]
        zero_shot = attribute_zero_shot_logits(features, side, a, scale)
        zs_predictions = zero_shot.argmax(axis=1)
        n_classes = len(attribute.classes)
        if requested == "none":
            accuracy = _weighted_accuracy(zs_predictions == truth, weights)
            choice = Choice(Candidate(ZERO_SHOT), accuracy, accuracy, 0.0, "zero-shot as asked (--adapt none)")
        else:
            choice = choose(features, truth, weights, zero_shot, n_classes, scale, requested)
        adaptation = AttributeAdaptation(
            attribute=attribute.name, requested=requested, candidate=choice.candidate, n_labels=len(rows),
            zero_shot_accuracy=choice.zero_shot_accuracy, cv_accuracy=choice.accuracy, reason=choice.reason,
            rows=rows, truth=truth, weights=weights, zero_shot_predictions=zs_predictions,
            served_predictions=zs_predictions)
        if adaptation.adapted:
            adaptation.served_predictions = out_of_fold(features, truth, weights, zero_shot, n_classes, scale,
                                                        requested)
            adaptation.contribution = _fit_contribution(choice.candidate, features, truth, weights, zero_shot,
                                                        n_classes, scale)
        out[attribute.name] = adaptation
    return out


def attribute_zero_shot_logits(features: np.ndarray, side, attribute_index: int, scale: float) -> np.ndarray:
    """(n, C_a) zero-shot class logits of one attribute (``side``: the schema's ClassSide)."""
    c0, c1 = int(side.class_offsets[attribute_index]), int(side.class_offsets[attribute_index + 1])
    p0, p1 = int(side.prompt_offsets[c0]), int(side.prompt_offsets[c1])
    return fewshot.zero_shot_logits(features, side.matrix[p0:p1], side.prompt_offsets[c0:c1 + 1] - p0,
                                    side.reduce[c0:c1], side.top_m[c0:c1], scale)


def _fit_contribution(candidate: Candidate, features, labels, weights, zero_shot, n_classes, scale) -> dict:
    """The fitted classifier on all labelled items as what :func:`build_adapted_side` folds in:
    ``zs_weight`` (0 or 1), linear ``weight_rows`` (C, D) and ``bias`` (C,), or a tip ``cache``."""
    adapter = _adapter(candidate.method, features, labels, weights, n_classes, scale, candidate.beta)
    factor = _scale_factor(zero_shot, adapter(features))
    alpha = 1.0 if candidate.alpha is None else candidate.alpha * factor
    out = {"zs_weight": 0.0 if candidate.alpha is None else 1.0}
    if candidate.method == "prototype":
        prototypes, has = fewshot.fit_prototypes(features, labels, n_classes, weights)
        out["weight_rows"] = alpha * scale * (fewshot.fill_matrix(has).T @ prototypes)
        out["bias"] = np.zeros(n_classes)
    elif candidate.method == "gda":
        weight_rows, bias, has = fewshot.fit_gda(features, labels, n_classes, weights)
        fill = fewshot.fill_matrix(has)
        out["weight_rows"] = alpha * (fill.T @ weight_rows)
        out["bias"] = alpha * (bias @ fill)
    else:
        out["cache"] = np.asarray(features, np.float64)
        out["values"] = alpha * fewshot.tip_values(labels, n_classes)
        out["beta"] = float(candidate.beta)
    return out


def build_adapted_side(schema, side, scale: float, adaptations: dict[str, AttributeAdaptation]) -> fewshot.AdaptedSide:
    """Every attribute of ``schema`` in the flat layout of :class:`clipengine.kernels.fewshot.AdaptedSide`:
    zero-shot (``side``: its ClassSide) plus, where ``adaptations`` adapted it, the fitted pieces."""
    dim = side.matrix.shape[1]
    n_classes = int(side.class_offsets[-1])
    linear = np.zeros((n_classes, dim))
    bias = np.zeros(n_classes)
    prompt_rows: list[np.ndarray] = []
    prompt_offsets = [0]
    zs_weight = np.ones(n_classes)
    caches: dict[float, list[tuple[np.ndarray, np.ndarray, int]]] = {}
    for a, attribute in enumerate(schema.attributes):
        c0, c1 = int(side.class_offsets[a]), int(side.class_offsets[a + 1])
        adaptation = adaptations.get(attribute.name)
        part = adaptation.contribution if adaptation is not None and adaptation.adapted else {}
        weight = part.get("zs_weight", 1.0)
        for c in range(c0, c1):
            p0, p1 = int(side.prompt_offsets[c]), int(side.prompt_offsets[c + 1])
            if weight and p1 - p0 == 1:  # a linear strategy: the class row folds into the linear part
                linear[c] += weight * scale * side.matrix[p0].astype(np.float64)
            elif weight:
                prompt_rows.append(side.matrix[p0:p1])
                zs_weight[c] = weight
            prompt_offsets.append(prompt_offsets[-1] + (p1 - p0 if weight and p1 - p0 > 1 else 0))
        if "weight_rows" in part:
            linear[c0:c1] += part["weight_rows"]
            bias[c0:c1] += part["bias"]
        elif "cache" in part:
            caches.setdefault(part["beta"], []).append((part["cache"], part["values"], c0))
    cache_rows, cache_index = _shared_cache(caches)
    betas = sorted(caches)
    values = np.zeros((len(betas), len(cache_rows), n_classes))
    for g, beta in enumerate(betas):
        for (cache, attribute_values, c0), positions in zip(caches[beta], cache_index[beta]):
            np.add.at(values[g][:, c0:c0 + attribute_values.shape[1]], positions, attribute_values)
    # an attribute with no prompt part: its first class subtracted from all (softmax is shift-invariant),
    # so that class needs no row (a binary attribute: one row)
    linear_index = np.arange(n_classes)
    for a in range(len(schema.attributes)):
        c0, c1 = int(side.class_offsets[a]), int(side.class_offsets[a + 1])
        if prompt_offsets[c1] == prompt_offsets[c0]:
            linear[c0:c1] -= linear[c0].copy()
            bias[c0:c1] -= bias[c0]
            values[:, :, c0:c1] -= values[:, :, c0:c0 + 1].copy()
            linear_index[c0] = -1
    kept = linear_index >= 0
    linear_index[kept] = np.arange(kept.sum())
    matrix = np.concatenate([linear[kept], *[p.astype(np.float64) for p in prompt_rows],
                             np.asarray(cache_rows, np.float64).reshape(-1, dim)])
    return fewshot.AdaptedSide(
        matrix=np.ascontiguousarray(matrix, np.float32), linear_index=linear_index.astype(np.int64),
        bias=bias.astype(np.float32), class_offsets=np.asarray(side.class_offsets, np.int64),
        prompt_offsets=np.asarray(prompt_offsets, np.int64), reduce=np.asarray(side.reduce, np.int8),
        top_m=np.asarray(side.top_m, np.int32), zs_weight=zs_weight.astype(np.float32), scale=float(scale),
        cache_betas=np.asarray(betas, np.float32), cache_values=np.ascontiguousarray(values[:, :, kept], np.float32))


def _shared_cache(caches):
    """One cache row per distinct labelled embedding across tip attributes (a sample labels the same
    items for every attribute): the rows and, per (β, attribute), its items' positions among them."""
    rows: list[np.ndarray] = []
    seen: dict[bytes, int] = {}
    index: dict[float, list[np.ndarray]] = {}
    for beta, parts in caches.items():
        index[beta] = []
        for cache, _, _ in parts:
            positions = []
            for vector in cache:
                key = vector.astype(np.float32).tobytes()
                if key not in seen:
                    seen[key] = len(rows)
                    rows.append(vector)
                positions.append(seen[key])
            index[beta].append(np.asarray(positions, np.int64))
    return rows, index
