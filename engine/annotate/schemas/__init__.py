"""Prompt schemas: metadata extraction as zero-shot multi-dimensional classification.

A schema (YAML) lists attributes; each attribute is a set of classes; each class
is described by several prompts, written out or expanded from templates over the
class's fill-ins (synonyms). The most similar class wins, with a confidence.

    attributes:
      hair_color:                 # exclusive by default: one class per item
        templates: ["a photo of a person with {} hair"]
        classes:
          black: ["black", "dark"]          # fill-ins for the templates
          blond: ["blond", "blonde"]
      eyeglasses:                 # binary: a class and its explicit counter-class
        classes:
          "yes": {prompts: ["a photo of a person wearing eyeglasses"]}
          "no": {prompts: ["a photo of a person without glasses"]}

Keys (all optional but ``attributes`` / ``classes``):

- top level: ``name``, ``description``, ``version``, ``strategy`` (default for every
  attribute), ``top_m``, ``templates`` (default templates for every attribute),
  ``attributes``.
- attribute: ``description``, ``truth`` (ground-truth columns for ``clipengine eval``), ``type`` (``exclusive`` or ``binary``; two-class
  attributes are binary by default), ``positive`` (the class counted as "1" of a
  binary attribute; default ``yes`` when present, else the first class), ``strategy``,
  ``top_m``, ``templates``, ``classes``.
- class: a list of fill-ins, one fill-in string, or a mapping with ``prompts``
  (written out), ``fill`` (fill-ins for the templates) and ``templates`` (this
  class's own templates).

Aggregation strategies (how a class's prompts become one score): ``naive`` (first
prompt only), ``mean`` (mean of the normalized prompt embeddings, re-normalized),
``max``, ``logsumexp`` (log of the mean of exp(scaled logits): a soft maximum) and
``topm`` (mean of the ``top_m`` best prompt logits).

A mistake names the file, the attribute and the problem in one line
(:class:`~clipengine.errors.ClipengineError`). ``Schema.hash`` hashes the canonical
expanded content plus :data:`FORMAT_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from clipengine.errors import ClipengineError

FORMAT_VERSION = 1
STRATEGIES = ("naive", "mean", "max", "logsumexp", "topm")
KINDS = ("exclusive", "binary")
DEFAULT_STRATEGY = "mean"
DEFAULT_TOP_M = 3
MAX_TOP_M = 32  # kernels keep the top-m prompt logits in a fixed local buffer
# the most prompts one schema may expand to (templates × fill-ins + written-out prompts): ImageNet's
# 1,000 classes × 80 templates fit; every prompt is encoded by the text tower once per model
MAX_PROMPTS = 100_000
MAX_PROMPT_CHARS = 1_000  # far past CLIP's 77 tokens (the tokenizer cuts there); bounds the expansion's memory
MAX_NAME_LENGTH = 200
BUILTIN_SCHEMAS = ("celeba", "fashion", "pedestrian", "scene")

_SCHEMA_KEYS = {"name", "description", "version", "strategy", "top_m", "templates", "attributes"}
_ATTRIBUTE_KEYS = {"description", "type", "positive", "strategy", "top_m", "templates", "classes", "truth"}
_CLASS_KEYS = {"prompts", "fill", "templates"}
# columns a run's tables already have: an attribute of the same name would collide in the joined table
_RESERVED_COLUMNS = {"path", "box", "file", "error"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SchemaClass:
    """One class of an attribute and its expanded prompts (in order; the first is the naive one)."""

    name: str
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class Attribute:
    """One metadata dimension: classes competing under a softmax."""

    name: str
    classes: tuple[SchemaClass, ...]
    kind: str = "exclusive"
    positive: str | None = None
    strategy: str = DEFAULT_STRATEGY
    top_m: int = DEFAULT_TOP_M
    description: str = ""
    truth: str | None = None  # how `clipengine eval` finds its ground truth (clipengine.annotate.evaluate syntax)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def n_prompts(self) -> int:
        return sum(len(c.prompts) for c in self.classes)


@dataclass(frozen=True)
class Schema:
    """An expanded, validated schema. ``hash`` identifies its content (not its file name)."""

    name: str
    attributes: tuple[Attribute, ...]
    source: str = ""
    description: str = ""
    version: str = ""
    hash: str = ""

    def attribute(self, name: str) -> Attribute:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise ClipengineError(f"schema '{self.name}': no attribute '{name}' (has: {', '.join(self.attribute_names)})")

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    @property
    def strategies(self) -> dict[str, str]:
        return {a.name: a.strategy for a in self.attributes}

    @property
    def strategy_name(self) -> str:
        """The schema's own strategies as one name: "mean", or "mean/max" when attributes differ."""
        return "/".join(sorted(set(self.strategies.values())))

    def prompts(self) -> list[str]:
        """Every prompt, attribute by attribute, class by class (the order of the prompt matrix)."""
        return [p for a in self.attributes for c in a.classes for p in c.prompts]

    def with_strategy(self, strategy: str | None = None, overrides: dict[str, str] | None = None) -> "Schema":
        """A copy with every attribute's strategy set to ``strategy`` and then ``overrides``
        (attribute → strategy) applied; the hash is recomputed."""
        overrides = dict(overrides or {})
        for name, value in overrides.items():
            self.attribute(name)
            _check_strategy(value, f"strategy override for attribute '{name}'")
        if strategy is not None:
            _check_strategy(strategy, "--strategy")
        attributes = tuple(
            replace(a, strategy=overrides.get(a.name, strategy or a.strategy)) for a in self.attributes
        )
        return _finish(replace(self, attributes=attributes))

    def to_dict(self) -> dict[str, Any]:
        """The canonical expanded content (what the hash covers)."""
        return {
            "format": FORMAT_VERSION,
            "attributes": [
                {
                    "name": a.name,
                    "kind": a.kind,
                    "positive": a.positive,
                    "strategy": a.strategy,
                    "top_m": a.top_m,
                    "classes": [{"name": c.name, "prompts": list(c.prompts)} for c in a.classes],
                }
                for a in self.attributes
            ],
        }


def list_schemas() -> list[str]:
    """Names of the built-in schemas shipped with the package."""
    return list(BUILTIN_SCHEMAS)


def load_schema(name_or_path: str | Path) -> Schema:
    """A built-in schema by name (``celeba``, ``fashion``, ``pedestrian``, ``scene``) or a YAML file."""
    text, source, default_name = _read_source(name_or_path)
    return parse_schema(text, source=source, default_name=default_name)


def parse_schema(text: str, *, source: str = "<schema>", default_name: str = "schema") -> Schema:
    """Parse and validate schema YAML text; ``source`` names it in error messages. The YAML is read
    within :mod:`clipengine.yamlfile`'s bounds and the expansion within :data:`MAX_PROMPTS`."""
    from clipengine.yamlfile import parse_yaml

    return _build_schema(parse_yaml(text, source=source), source, default_name)


# ---- loading ---------------------------------------------------------------------------------


def _read_source(name_or_path: str | Path) -> tuple[str, str, str]:
    text_name = str(name_or_path)
    if text_name in BUILTIN_SCHEMAS:
        resource = resources.files(__name__).joinpath(f"{text_name}.yaml")
        return resource.read_text(encoding="utf-8"), f"schema '{text_name}' ({text_name}.yaml)", text_name
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ClipengineError(
            f"unknown schema '{text_name}': not a built-in ({', '.join(BUILTIN_SCHEMAS)}) nor an existing YAML file"
        )
    from clipengine.yamlfile import read_yaml_text

    return read_yaml_text(path), str(path), path.stem


# ---- validation and expansion ----------------------------------------------------------------


def _check_strategy(value: Any, where: str) -> str:
    if value not in STRATEGIES:
        raise ClipengineError(f"{where}: unknown strategy {value!r} (choose from {', '.join(STRATEGIES)})")
    return value


def _check_top_m(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_M:
        raise ClipengineError(f"{where}: 'top_m' must be an integer from 1 to {MAX_TOP_M}, got {value!r}")
    return value


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise ClipengineError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _check_name(value: Any, what: str, where: str) -> str:
    if isinstance(value, bool):
        raise ClipengineError(
            f"{where}: {what} name parsed as the YAML boolean {value}; quote it, e.g. \"{'yes' if value else 'no'}\""
        )
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ClipengineError(f"{where}: {what} name must be a non-empty string, got {value!r}")
    return value


def _string_list(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ClipengineError(f"{where}: '{key}' must be a non-empty list of strings")
    out = []
    for item in value:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str) or not item.strip():
            raise ClipengineError(f"{where}: '{key}' must hold non-empty strings, got {item!r}")
        out.append(item.strip())
    return out


def _templates(value: Any, where: str) -> list[str]:
    templates = _string_list(value, "templates", where)
    for template in templates:
        if template.count("{}") != 1 or re.search(r"\{(?!\})|(?<!\{)\}", template):
            raise ClipengineError(f"{where}: template {template!r} must contain '{{}}' exactly once and no other braces")
    return templates


class _PromptBudget:
    """What is left of :data:`MAX_PROMPTS` while a schema expands; checked before each class's
    prompts are built, so an oversized schema fails before it takes the memory."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, count: int, where: str, how: str) -> None:
        self.used += count
        if self.used > MAX_PROMPTS:
            raise ClipengineError(f"{where}: {count:,} prompts ({how}) take the schema past {MAX_PROMPTS:,} prompts, "
                                  "the most one schema may expand to; use fewer templates or fill-ins")


def _expand_class(name: str, value: Any, templates: list[str] | None, where: str, budget: _PromptBudget) -> SchemaClass:
    where = f"{where}, class '{name}'"
    prompts: list[str] = []
    fill: list[str] = []
    own_templates = templates
    if isinstance(value, dict):
        _check_keys(value, _CLASS_KEYS, where)
        if not value:
            raise ClipengineError(f"{where}: needs 'prompts' or 'fill'")
        if "templates" in value:
            own_templates = _templates(value["templates"], where)
        if "prompts" in value:
            prompts = _string_list(value["prompts"], "prompts", where)
        if "fill" in value:
            fill = _string_list(value["fill"], "fill", where)
    elif value is None:
        raise ClipengineError(f"{where}: no prompts (give fill-ins for the templates or {{prompts: [...]}})")
    else:
        fill = _string_list(value, "fill-ins", where)
    if fill and not own_templates:
        raise ClipengineError(f"{where}: fill-ins {fill[:3]} given but the attribute has no 'templates'")
    longest = max((len(t) - 2 for t in own_templates or ()), default=0) + max(map(len, fill), default=0)
    longest = max([longest, *map(len, prompts)])
    if longest > MAX_PROMPT_CHARS:
        raise ClipengineError(f"{where}: a prompt of {longest:,} characters; at most {MAX_PROMPT_CHARS:,} "
                              "(CLIP reads the first 77 tokens)")
    expanded = len(own_templates or ()) * len(fill)
    budget.take(expanded + len(prompts), where,
                f"{len(own_templates or ())} templates × {len(fill)} fill-ins + {len(prompts)} written out")
    if fill:
        # template-major order: the naive prompt is the first template with the first fill-in
        prompts = [t.replace("{}", f) for t in own_templates for f in fill] + prompts
    unique = list(dict.fromkeys(prompts))
    return SchemaClass(name=name, prompts=tuple(unique))


def _build_attribute(name: str, raw: Any, defaults: dict[str, Any], where: str, budget: _PromptBudget) -> Attribute:
    where = f"{where}: attribute '{name}'"
    if not _NAME.match(name):
        raise ClipengineError(f"{where}: the name must be letters, digits and '_' (it becomes a column name)")
    if name in _RESERVED_COLUMNS or name.endswith(("_prob", "_margin")):
        raise ClipengineError(f"{where}: the name collides with a metadata column ({', '.join(sorted(_RESERVED_COLUMNS))} "
                              "and names ending in _prob or _margin are taken); rename it")
    if not isinstance(raw, dict):
        raise ClipengineError(f"{where}: must be a mapping with 'classes'")
    _check_keys(raw, _ATTRIBUTE_KEYS, where)
    if "classes" not in raw:
        raise ClipengineError(f"{where}: missing 'classes'")
    templates = _templates(raw["templates"], where) if "templates" in raw else defaults["templates"]
    strategy = _check_strategy(raw.get("strategy", defaults["strategy"]), where)
    top_m = _check_top_m(raw.get("top_m", defaults["top_m"]), where)
    classes_raw = raw["classes"]
    if not isinstance(classes_raw, dict) or not classes_raw:
        raise ClipengineError(f"{where}: 'classes' must be a non-empty mapping of class name → prompts")
    classes = []
    for class_name, class_value in classes_raw.items():
        class_name = _check_name(class_name, "class", where)
        classes.append(_expand_class(class_name, class_value, templates, where, budget))
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ClipengineError(f"{where}: class names repeat after conversion to text: {names}")
    if len(classes) < 2:
        raise ClipengineError(
            f"{where}: needs at least two classes (describe the counter-class positively, "
            "e.g. \"no\": {prompts: [\"a person with a full head of hair\"]})"
        )
    kind = raw.get("type", "binary" if len(classes) == 2 else "exclusive")
    if kind not in KINDS:
        raise ClipengineError(f"{where}: unknown type {kind!r} (choose from {', '.join(KINDS)})")
    positive = None
    if kind == "binary":
        if len(classes) != 2:
            raise ClipengineError(f"{where}: a binary attribute has exactly two classes, got {len(classes)}")
        positive = raw.get("positive", "yes" if "yes" in names else names[0])
        positive = _check_name(positive, "positive class", where)
        if positive not in names:
            raise ClipengineError(f"{where}: positive class {positive!r} is not one of its classes {names}")
    elif "positive" in raw:
        raise ClipengineError(f"{where}: 'positive' applies to binary attributes only")
    seen: dict[str, str] = {}
    for c in classes:
        for prompt in c.prompts:
            if prompt in seen and seen[prompt] != c.name:
                raise ClipengineError(f"{where}: prompt {prompt!r} describes both '{seen[prompt]}' and '{c.name}'")
            seen[prompt] = c.name
    description = raw.get("description", "")
    truth = raw.get("truth")
    if truth is not None and (not isinstance(truth, str) or not truth.strip()):
        raise ClipengineError(f"{where}: 'truth' must be a column spec string, e.g. Eyeglasses or '!No_Beard'")
    return Attribute(
        name=name,
        classes=tuple(classes),
        kind=kind,
        positive=positive,
        strategy=strategy,
        top_m=top_m,
        description=str(description or ""),
        truth=truth,
    )


def _build_schema(raw: Any, source: str, default_name: str) -> Schema:
    if not isinstance(raw, dict) or "attributes" not in raw:
        raise ClipengineError(f"{source}: needs a top-level 'attributes' mapping")
    _check_keys(raw, _SCHEMA_KEYS, source)
    defaults = {
        "strategy": _check_strategy(raw.get("strategy", DEFAULT_STRATEGY), source),
        "top_m": _check_top_m(raw.get("top_m", DEFAULT_TOP_M), source),
        "templates": _templates(raw["templates"], source) if "templates" in raw else None,
    }
    attributes_raw = raw["attributes"]
    if not isinstance(attributes_raw, dict) or not attributes_raw:
        raise ClipengineError(f"{source}: 'attributes' must be a non-empty mapping of attribute name → definition")
    attributes = []
    budget = _PromptBudget()
    for name, value in attributes_raw.items():
        name = _check_name(name, "attribute", source)
        attributes.append(_build_attribute(name, value, defaults, source, budget))
    schema = Schema(
        name=_schema_name(raw.get("name", default_name), source),
        attributes=tuple(attributes),
        source=source,
        description=str(raw.get("description", "") or ""),
        version=str(raw.get("version", "") or ""),
    )
    return _finish(schema)


def _schema_name(value: Any, source: str) -> str:
    """The schema's ``name``: shown in summaries and reports, never part of a file path (caches are
    keyed by content hashes); one printable line."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ClipengineError(f"{source}: 'name' must be a non-empty string, got {value!r}")
    if not value.isprintable() or len(value) > MAX_NAME_LENGTH:
        raise ClipengineError(f"{source}: 'name' must be one line of at most {MAX_NAME_LENGTH} printable "
                              f"characters, got {value[:40]!r}")
    return value.strip()


def _finish(schema: Schema) -> Schema:
    canonical = json.dumps(schema.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return replace(schema, hash=hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16])
