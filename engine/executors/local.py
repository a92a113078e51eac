"""The local executor: the encode stage in this process (decode threads + one encoder).

It is :func:`clipengine.encode.stage.encode_items` itself, under the executor registry's name.
"""

from __future__ import annotations

import os


def encode_items(items, out_dir: str | os.PathLike, config, *, encoder=None):
    """``clipengine.encode.stage.encode_items(items, out_dir, config, encoder=encoder) -> EncodeResult``."""
    from clipengine.encode.stage import encode_items as encode_here

    return encode_here(items, out_dir, config, encoder=encoder)


__all__ = ["encode_items"]
