r"""Data inside the Markdown clipengine writes (``summary.md``, ``label_quality.md``).

Every string that comes from data (paths, class and attribute names, feature values, reasons) goes
through :func:`escape`, so a value such as ``<b>x</b>``, ``a|b`` or ``# title`` shows as written in
any Markdown renderer instead of becoming markup, a broken table or a heading.

    >>> print(escape("hostile<b>shape</b> | x"))
    hostile\<b\>shape\</b\> \| x
"""

from __future__ import annotations

import re
from typing import Any

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~&])")


def escape(text: Any) -> str:
    """Data as literal Markdown text: Markdown's and HTML's special characters backslash-escaped,
    line breaks folded, so a value such as ``<b>x</b>`` or ``a|b`` shows as written."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))
