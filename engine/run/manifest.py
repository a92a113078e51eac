"""The run's ``manifest.json``: inputs with hashes, model, schema, parameters, versions, and
per-stage status, input fingerprint, outputs and timings.

A stage is finished when its record says ``"status": "done"`` with the fingerprint of the
inputs it ran on and all its outputs exist. The record is written (atomically) only after
the stage's outputs are, so a run killed at any moment finds either a finished stage or one
to run again; never a finished stage with missing outputs.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipengine import artifacts

FORMAT_VERSION = 1
STATUS_DONE = "done"
STATUS_RUNNING = "running"


def fingerprint(*parts: Any) -> str:
    """A stable sha256 of JSON-serializable parts (dict keys sorted; Paths as strings)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the results (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("clipengine", "numpy", "polars", "pyarrow", "numba", "torch", "open_clip_torch", "onnxruntime",
                 "pillow", "sentence-transformers", "efficientnet-lite-pytorch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


class Manifest:
    """``RUN/manifest.json`` in memory; every change is saved at once, atomically (never with
    ``read_only``: a finished run on read-only storage is only checked)."""

    def __init__(self, run_dir: Path, *, read_only: bool = False):
        self.run_dir = Path(run_dir)
        self.read_only = read_only
        self.data: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        data = artifacts.read_manifest(self.run_dir)  # None when absent or unreadable: start over
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            data = {"format": FORMAT_VERSION, "stages": {}}
        data.setdefault("stages", {})
        return data

    def save(self) -> None:
        if not self.read_only:
            artifacts.write_manifest(self.run_dir, self.data)

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    # ---- stages -------------------------------------------------------------------------------
    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def is_done(self, name: str, stage_fingerprint: str) -> bool:
        """True when ``name`` finished on inputs with this fingerprint and its outputs still exist."""
        record = self.stage(name)
        if not record or record.get("status") != STATUS_DONE or record.get("fingerprint") != stage_fingerprint:
            return False
        return all((self.run_dir / output).exists() for output in record.get("outputs", []))

    def start(self, name: str, stage_fingerprint: str) -> float:
        previous = self.stage(name) or {}
        self.data["stages"][name] = {
            "status": STATUS_RUNNING,
            "fingerprint": stage_fingerprint,
            "started": now_iso(),
            "attempts": int(previous.get("attempts", 0)) + 1,
        }
        self.save()
        return time.perf_counter()

    def finish(self, name: str, started: float, *, outputs: list[str], info: dict | None = None) -> dict:
        record = self.data["stages"][name]
        record.update(
            status=STATUS_DONE,
            finished=now_iso(),
            seconds=round(time.perf_counter() - started, 3),
            outputs=list(outputs),
            ran=True,
            **(info or {}),
        )
        self.save()
        return record

    def mark_skipped(self, name: str) -> None:
        """A finished stage reused by this run: keep its record, note it did not run now."""
        self.data["stages"][name]["ran"] = False
        self.save()

    def timings(self) -> dict[str, float]:
        return {name: rec["seconds"] for name, rec in self.data["stages"].items() if "seconds" in rec}
