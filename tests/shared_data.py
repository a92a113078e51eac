"""Where the shared reference data lives: ``shared/data/`` beside the checkout (``../shared``) or inside it."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLICELINE_DATA = next((p for p in (REPO.parent / "shared" / "data" / "sliceline", REPO / "shared" / "data" / "sliceline")
                       if p.is_dir()), REPO.parent / "shared" / "data" / "sliceline")
