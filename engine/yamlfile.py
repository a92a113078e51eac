"""The one YAML reader for files users give (prompt schemas, ``run --config``, ODD files).

YAML's anchors and aliases let a few hundred bytes stand for billions of nodes (each alias repeats
its anchor's whole content, and anchors can alias each other), and nesting drives PyYAML's composer
into Python's recursion limit. So every file is read with bounds checked before anything is built:

- at most :data:`MAX_BYTES` of text;
- at most :data:`MAX_DEPTH` levels of nesting, aliases expanded;
- at most :data:`MAX_NODES` nodes once every alias (and ``<<`` merge) is expanded: the size of
  what a program walking the data would see, whatever the file's own size;
- no alias that contains its own anchor, and no key twice in one mapping (PyYAML keeps the last
  one silently).

Only plain data is built (PyYAML's ``SafeLoader``: no Python objects, no code). A file past a bound,
or not valid YAML, gets one line (:class:`~clipengine.errors.ClipengineError`) naming the file, the
line and the key where it happens.

    >>> parse_yaml("a: &x [1, 2]\\nb: *x", source="example")
    {'a': [1, 2], 'b': [1, 2]}
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from clipengine.errors import ClipengineError

MAX_BYTES = 8 << 20  # the largest YAML file read
MAX_DEPTH = 64  # levels of nesting (mappings and sequences), aliases expanded
MAX_NODES = 250_000  # nodes once every alias is expanded (a schema at the prompt limit needs about half)


def read_yaml(path: str | os.PathLike, *, what: str = "", text_scalars: bool = False, aliases: bool = True) -> Any:
    """The data of the YAML file ``path`` (None for an empty file), read within the bounds above.

    ``what`` names the file in errors (e.g. ``"--config"``): ``"--config job.yaml: …"``; for
    ``text_scalars`` and ``aliases`` see :func:`parse_yaml`.
    """
    return parse_yaml(read_yaml_text(path, what=what), source=f"{what} {path}".strip(), text_scalars=text_scalars,
                      aliases=aliases)


def read_yaml_text(path: str | os.PathLike, *, what: str = "") -> str:
    """The UTF-8 text of ``path``, refused in one line when it is absent, unreadable or larger than
    :data:`MAX_BYTES` (checked before reading)."""
    source = f"{what} {path}".strip()
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ClipengineError(f"{source}: not a file")
        if size > MAX_BYTES:
            raise ClipengineError(f"{source}: {size:,} bytes; a YAML file may hold at most {MAX_BYTES:,}")
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ClipengineError(f"{source}: no such file") from None
    except OSError as error:
        raise ClipengineError(f"{source}: cannot read it ({error.strerror or error})") from None
    if len(data) > MAX_BYTES:  # grew while being read, or a special file that reports no size
        raise ClipengineError(f"{source}: more than {MAX_BYTES:,} bytes; a YAML file may hold at most that")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ClipengineError(f"{source}: not UTF-8 text (byte {error.start})") from None


def parse_yaml(text: str, *, source: str, text_scalars: bool = False, aliases: bool = True) -> Any:
    r"""The data of YAML ``text`` (one document; None when empty), within the bounds above.
    ``source`` names the text in errors. ``text_scalars``: every plain scalar is a string (no YAML 1.1
    booleans, numbers or dates: ``no`` stays ``"no"``); ``aliases=False``: anchors and aliases are
    refused outright.

        >>> parse_yaml("country: no\nspeed: 30", source="odd", text_scalars=True)
        {'country': 'no', 'speed': '30'}
    """
    import yaml

    if len(text) > MAX_BYTES:
        raise ClipengineError(f"{source}: more than {MAX_BYTES:,} characters; a YAML file may hold at most that")
    loader = _loader_class(text_scalars, aliases)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ClipengineError(f"{source}: not valid YAML: {line}{problem}") from None
    finally:
        loader.dispose()


# ---- bounds ----------------------------------------------------------------------------------
def _check_expanded(root, source: str) -> None:
    """Refuse a node graph whose expansion passes :data:`MAX_NODES` or :data:`MAX_DEPTH`, or that
    holds a cycle. Each distinct node is visited once (sizes are memoized), so the check costs the
    size of the file, not of its expansion."""
    from yaml.nodes import MappingNode, SequenceNode

    def children(node) -> list:
        if isinstance(node, SequenceNode):
            return list(node.value)
        if isinstance(node, MappingNode):
            return [part for pair in node.value for part in pair]
        return []

    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:  # iterative post-order: no recursion whatever the nesting
        node, expanded = stack.pop()
        key = id(node)
        if expanded:
            on_path.discard(key)
            kids = children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            continue
        if key in size:
            continue
        if key in on_path:
            raise ClipengineError(f"{source}: line {node.start_mark.line + 1}: an alias refers to the anchor that "
                                  "contains it (the data would be infinite)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children(node) if id(child) not in size)
        for child in children(node):
            if id(child) in on_path:
                raise ClipengineError(f"{source}: line {child.start_mark.line + 1}: an alias refers to the anchor "
                                      "that contains it (the data would be infinite)")
    if size[id(root)] > MAX_NODES:
        node, where = _largest_path(root, children, size, MAX_NODES)
        raise ClipengineError(
            f"{source}: line {node.start_mark.line + 1}: {where} expands to {size[id(node)]:,} YAML nodes once its "
            f"aliases are repeated; a file may expand to at most {MAX_NODES:,}")
    if depth[id(root)] > MAX_DEPTH:
        node, where = _largest_path(root, children, depth, MAX_DEPTH)
        raise ClipengineError(f"{source}: line {node.start_mark.line + 1}: {where} nests more than {MAX_DEPTH} "
                              "levels deep (aliases expanded); flatten it")


def _largest_path(root, children, measure: dict[int, int], limit: int):
    """The deepest node on a path from ``root`` whose ``measure`` passes ``limit`` and the key path
    to it (``'attributes' → 'hair'``), for the error message."""
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode

    node, names = root, []
    while True:
        step = None
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if measure[id(value)] > limit:
                    label = repr(key.value) if isinstance(key, ScalarNode) else "a key"
                    step = (value, label)
                    break
        elif isinstance(node, SequenceNode):
            for index, value in enumerate(node.value):
                if measure[id(value)] > limit:
                    step = (value, f"item {index + 1}")
                    break
        if step is None or len(names) > MAX_DEPTH:
            break
        node = step[0]
        names.append(step[1])
    shown = names if len(names) <= 4 else [*names[:3], "…"]
    return node, ("key " + " → ".join(shown) if names else "the document")


@functools.cache
def _loader_class(text_scalars: bool = False, aliases: bool = True):
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that bounds nesting while composing (PyYAML's composer recurses once per level)
        and refuses a key that appears twice in one mapping."""

        if text_scalars:
            yaml_implicit_resolvers: dict = {}

        def __init__(self, stream):
            super().__init__(stream)
            self.nesting = 0

        def compose_node(self, parent, index):
            if not aliases and self.check_event(yaml.events.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "anchors and aliases are not allowed here",
                                                  self.peek_event().start_mark)
            if self.nesting >= MAX_DEPTH:
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep; flatten it", event.start_mark)
            self.nesting += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.nesting -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class refuses it with its own message
                    duplicate = False
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return BoundedLoader
