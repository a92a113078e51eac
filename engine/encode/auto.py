"""How ``--backend auto`` / no ``--precision`` choose on the CPU: by measuring this CPU, not by its flags.

:mod:`clipengine.bindings.cpu_probe` times every CPU path (torch fp32, bf16 and int8, ONNX Runtime fp32 and
int8) on a short copy of the model's image tower, once per CPU kind, cores and software (cached); this module
owns the rule (:func:`decide_cpu_path`) and what ``model.json`` records about it.

The rule, among the measured paths that the user's ``--backend``/``--precision`` allow:

1. a path that changes the numbers (bf16, int8) is a candidate only if its rows keep cosine ≥
   :data:`MIN_COSINE` to fp32's on the probe images (unless the user named that precision: then only the
   backend is chosen, and the cosine is reported);
2. the exact path (fp32, torch first) is kept unless a candidate is at least :data:`MIN_GAIN` times
   faster (a smaller gain is within a shared machine's noise and not worth different numbers or an
   ONNX export); otherwise the fastest candidate wins;
3. a winner that changes the numbers is checked once more on the whole model (its own weights, all its
   blocks: error grows with depth) and, below :data:`MIN_COSINE` there, set aside for the next best.

A tower the probe cannot copy (not a ViT) keeps fp32 on torch, which needs no measurement to be right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipengine.errors import ClipengineError

MIN_COSINE = 0.9999  # the agreement every default precision keeps with fp32
MIN_GAIN = 1.05  # how much faster than the exact path another path must be to be chosen
EXACT_PRECISION = "fp32"
EXACT_PATH = "torch-fp32"


@dataclass(frozen=True)
class CpuChoice:
    """``backend`` and ``precision`` chosen, ``reason`` (one line for people), and ``details`` for
    ``model.json`` (the measurements, the CPU, the probe)."""

    backend: str
    precision: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"chosen": f"{self.backend} {self.precision}", "reason": self.reason, **self.details}


def _split(path: str) -> tuple[str, str]:
    backend, precision = path.rsplit("-", 1)
    return backend, precision


def decide_cpu_path(measured: dict[str, dict], *, backend: str | None = None,
                    precision: str | None = None) -> CpuChoice:
    """The choice among ``measured`` (path name "backend-precision" → ``{"img_s", "cosine"}`` or
    ``{"skipped": why}``, as :func:`clipengine.bindings.cpu_probe.measure_paths` gives) within the user's
    ``backend``/``precision`` (None: any), by the module's rule."""
    allowed = [name for name in measured
               if (backend is None or _split(name)[0] == backend) and (precision is None or _split(name)[1] == precision)]
    usable, notes = [], []
    for name in allowed:
        entry = measured[name]
        if "img_s" not in entry:
            notes.append(f"{name} set aside: {entry.get('skipped', 'no rate')}")
        elif _split(name)[1] != EXACT_PRECISION and entry.get("cosine", 0.0) < MIN_COSINE:
            if precision is None:
                notes.append(f"{name} not taken: cosine {entry.get('cosine', 0.0):.5f} < {MIN_COSINE}")
            else:
                notes.append(f"{name}: cosine {entry.get('cosine', 0.0):.5f} < {MIN_COSINE}, "
                             f"taken as --precision {precision} asks")
                usable.append(name)
        else:
            usable.append(name)
    if not usable:
        raise ClipengineError("no CPU encode path could be measured for "
                              f"--backend {backend or 'auto'} --precision {precision or 'auto'} ({'; '.join(notes)})")
    exact = [name for name in usable if _split(name)[1] == EXACT_PRECISION]
    baseline = EXACT_PATH if EXACT_PATH in exact else (exact[0] if exact else None)
    fastest = max(usable, key=lambda name: measured[name]["img_s"])
    chosen = fastest
    if baseline is not None and fastest != baseline and measured[fastest]["img_s"] < MIN_GAIN * measured[baseline]["img_s"]:
        chosen = baseline
    rate = {name: measured[name]["img_s"] for name in usable}
    if baseline is not None:
        relative = ", ".join(f"{name} {rate[name] / rate[baseline]:.2f}×" for name in sorted(usable, key=rate.get,
                                                                                           reverse=True))
        why = (f"measured on this CPU, relative to {baseline}: {relative}; "
               f"another path must be ≥ {MIN_GAIN:g}× the exact one to be chosen")
    else:
        why = "measured on this CPU: " + ", ".join(f"{name} {rate[name]:.1f} img/s" for name in usable)
    if notes:
        why += "; " + "; ".join(notes)
    return CpuChoice(*_split(chosen), reason=why)


def choose_cpu_path(towers, *, backend: str | None, precision: str | None, num_threads: int, cache_dir) -> CpuChoice:
    """The :class:`CpuChoice` for a model's ``towers`` on this CPU (``backend``/``precision`` None: free to
    choose), from the cached probe measurements (measured now where there are none)."""
    from clipengine.bindings.cpu_probe import ProbeShape, cached_measurements, model_cosine

    shape = ProbeShape.of_towers(towers)
    if shape is None:
        chosen_backend = backend or ("onnxruntime" if precision == "int8" else "torch")
        return CpuChoice(chosen_backend, precision or EXACT_PRECISION,
                         reason=f"not measured: the probe copies ViT towers, not {type(towers.image_tower).__name__}; "
                                "fp32 needs no measurement to be right")
    probe = cached_measurements(shape, num_threads=num_threads, cache_dir=cache_dir)
    measured = {name: dict(entry) for name, entry in probe["measured"].items()}
    while True:
        choice = decide_cpu_path(measured, backend=backend, precision=precision)
        if choice.precision == EXACT_PRECISION or precision is not None:
            break
        path = f"{choice.backend}-{choice.precision}"
        cosine = model_cosine(towers, path, num_threads=num_threads, cache_dir=cache_dir)
        measured[path]["model_cosine"] = cosine
        if cosine >= MIN_COSINE:
            break
        measured[path] = {"skipped": f"the whole model's cosine {cosine:.5f} < {MIN_COSINE}", **measured[path]}
        measured[path].pop("img_s", None)
    details = {key: probe[key] for key in ("cpu", "probe", "date", "seconds", "cached", "file") if key in probe}
    return CpuChoice(choice.backend, choice.precision, choice.reason, {"measured": measured, **details})
