"""Executors: where the encode stage runs. Each has the call shape of
:func:`clipengine.encode.stage.encode_items` — ``(items, out_dir, config, *, encoder=None) -> EncodeResult`` —
and writes the same run-directory files, so a job picks one by name.

- ``local``: this process (decode threads + one encoder), :mod:`clipengine.executors.local`.
- ``ray``: a Ray cluster (decode as CPU tasks, encoders in an actor pool that also labels each
  shard, shard files on any pyarrow filesystem as checkpoints), :mod:`clipengine.executors.ray`;
  needs the ``clipengine[ray]`` extra.

Executors in :data:`ANNOTATES_IN_PASS` also take ``annotation=InPassAnnotation(...)``: they label the
rows in the encode pass and write the metadata files themselves (what the annotate stage would write).

Modules are imported on first use: naming an executor imports nothing heavy.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from clipengine.errors import ClipengineError

# option of an executor -> its `clipengine run` flag (for messages)
OPTION_FLAGS = {"address": "--ray-address", "num_workers": "--ray-workers", "shards": "--ray-shards"}

# executor name -> "module:function"
EXECUTORS: dict[str, str] = {
    "local": "clipengine.executors.local:encode_items",
    "ray": "clipengine.executors.ray:encode_items",
}
ANNOTATES_IN_PASS = frozenset({"ray"})


@dataclass(frozen=True)
class InPassAnnotation:
    """Labelling asked of the encode pass. ``targets``: (file name in the output folder, strategy-resolved
    ``Schema``) per metadata file, e.g. ``(artifacts.METADATA, schema)``; ``text_encoder(model_record)``:
    an encoder with ``encode_texts`` for that model, called on the driver only when the schema's prompt
    embeddings are not cached; ``config``: the ``AnnotateConfig`` (``device``, ``chunk_rows``).
    The files are those :func:`clipengine.annotate.stage.write_metadata` writes."""

    targets: tuple[tuple[str, Any], ...]
    text_encoder: Callable[[dict], Any]
    config: Any


def load_executor(name: str) -> Callable[..., Any]:
    """The encode function of executor ``name`` (see :data:`EXECUTORS`)."""
    target = EXECUTORS.get(name)
    if target is None:
        raise ClipengineError(f"--executor {name!r} is not available; use one of: {', '.join(EXECUTORS)}")
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def create_executor(name: str, **options: Any) -> Callable[..., Any]:
    """``encode(items, out_dir, config, *, encoder=None) -> EncodeResult`` of executor ``name`` with
    its own ``options`` bound (None values are left out, so callers may pass every option they have)."""
    given = {key: value for key, value in options.items() if value is not None}
    encode = load_executor(name)
    if not given:
        return encode
    if name == "local":
        raise ClipengineError(
            f"{', '.join(OPTION_FLAGS.get(key, '--' + key.replace('_', '-')) for key in sorted(given))}: "
            "only with --executor ray"
        )
    return functools.partial(encode, **given)


__all__ = ["ANNOTATES_IN_PASS", "EXECUTORS", "InPassAnnotation", "create_executor", "load_executor"]
