"""The operational design domain (ODD) file: features, their allowed values, excluded combinations.

An ODD file is YAML, read as data::

    features:
      weather: [clear, rain, fog, snow]
      time: [day, night]
      season: [winter, summer]
    exclude:
      - {weather: snow, season: summer}
      - {weather: [fog, rain], time: night, season: summer}   # a list: any of these values

``features`` maps each feature (a column of the table) to its allowed values, in the order reports
show them; a value of an item outside that list makes the item *out of the ODD*. Each ``exclude`` entry
is a combination that cannot occur (or is out of scope): every t-way combination containing it leaves
the denominator of coverage, and items showing it are out of the ODD. Optional ``name`` and
``description`` keys document the file.

Every plain scalar is read as text exactly as written (``yes``, ``1``, ``01`` and ``null`` stay the
strings they look like; YAML 1.1 would turn ``yes`` into a boolean), and table values are compared as
text: a Boolean column's values are ``true`` / ``false``, an integer column's the digits. The file is
read with a safe loader, at most ``MAX_ODD_BYTES`` long, without anchors/aliases or duplicate keys.
A bad file raises a one-line :class:`~clipengine.errors.ClipengineError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clipengine.errors import ClipengineError

MAX_ODD_BYTES = 1 << 20
MAX_FEATURES = 1024
MAX_VALUES = 4096  # per feature
MAX_RULES = 100_000
KNOWN_KEYS = ("features", "exclude", "name", "description")


@dataclass(frozen=True)
class Odd:
    """A parsed ODD: ``features`` (name → allowed values, in file order), ``exclude`` (each rule:
    feature → the values it matches), ``source`` (the file, for messages)."""

    features: dict[str, tuple[str, ...]]
    exclude: tuple[dict[str, tuple[str, ...]], ...] = ()
    source: str = "<odd>"
    name: str | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ODD as plain data (what a report or ``coverage.json`` records)."""
        out: dict[str, Any] = {"features": {k: list(v) for k, v in self.features.items()}}
        out["exclude"] = [{k: (v[0] if len(v) == 1 else list(v)) for k, v in rule.items()} for rule in self.exclude]
        if self.name:
            out["name"] = self.name
        return out


def load_odd(path: str | Path) -> Odd:
    """Read and validate an ODD file (see the module docstring for the form)."""
    path = Path(path).expanduser()
    source = f"ODD file '{path}'"
    if not path.is_file():
        raise ClipengineError(f"{source} not found")
    size = path.stat().st_size
    if size > MAX_ODD_BYTES:
        raise ClipengineError(f"{source} is {size} bytes; an ODD file may have at most {MAX_ODD_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ClipengineError(f"{source}: cannot read it: {error}") from None
    return replace(parse_odd(text, source=source), path=str(path))


def parse_odd(text: str, *, source: str = "ODD") -> Odd:
    """Parse and validate ODD YAML text; ``source`` names it in error messages. The YAML is plain data
    (:func:`clipengine.yamlfile.parse_yaml`: bounded, every scalar read as text, no aliases)."""
    from clipengine.yamlfile import parse_yaml

    if len(text.encode("utf-8")) > MAX_ODD_BYTES:
        raise ClipengineError(f"{source} is larger than {MAX_ODD_BYTES} bytes")
    return _build(parse_yaml(text, source=source, text_scalars=True, aliases=False), source)


def _scalar(value: Any, where: str, source: str) -> str:
    if not isinstance(value, str):
        kind = "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else type(value).__name__
        raise ClipengineError(f"{source}: '{where}' must be a value (text), not {kind}")
    if value == "":
        raise ClipengineError(f"{source}: '{where}' is empty")
    return value


def _build(raw: Any, source: str) -> Odd:
    if raw is None:
        raise ClipengineError(f"{source} is empty; it needs a 'features' mapping")
    if not isinstance(raw, dict):
        raise ClipengineError(f"{source}: the top level must be a mapping with a 'features' key")
    unknown = [key for key in raw if key not in KNOWN_KEYS]
    if unknown:
        raise ClipengineError(f"{source}: unknown key '{unknown[0]}' (known keys: {', '.join(KNOWN_KEYS)})")
    if "features" not in raw:
        raise ClipengineError(f"{source}: 'features' is missing (a mapping of each feature to its values)")
    features_raw = raw["features"]
    if not isinstance(features_raw, dict) or not features_raw:
        raise ClipengineError(f"{source}: 'features' must map each feature to a list of its values")
    if len(features_raw) > MAX_FEATURES:
        raise ClipengineError(f"{source}: 'features' has {len(features_raw)} features; at most {MAX_FEATURES}")
    features: dict[str, tuple[str, ...]] = {}
    for name, values in features_raw.items():
        name = _scalar(name, "features", source)
        where = f"features.{name}"
        if not isinstance(values, list) or not values:
            raise ClipengineError(f"{source}: '{where}' must be a non-empty list of values")
        if len(values) > MAX_VALUES:
            raise ClipengineError(f"{source}: '{where}' has {len(values)} values; at most {MAX_VALUES}")
        seen: list[str] = []
        for i, value in enumerate(values):
            value = _scalar(value, f"{where}[{i}]", source)
            if value in seen:
                raise ClipengineError(f"{source}: '{where}' lists '{value}' twice")
            seen.append(value)
        features[name] = tuple(seen)

    rules_raw = raw.get("exclude") or []
    if not isinstance(rules_raw, list):
        raise ClipengineError(f"{source}: 'exclude' must be a list of combinations such as {{weather: snow, "
                              f"season: summer}}")
    if len(rules_raw) > MAX_RULES:
        raise ClipengineError(f"{source}: 'exclude' has {len(rules_raw)} entries; at most {MAX_RULES}")
    rules = []
    for i, rule_raw in enumerate(rules_raw):
        where = f"exclude[{i}]"
        if not isinstance(rule_raw, dict) or not rule_raw:
            raise ClipengineError(f"{source}: '{where}' must map features to values, e.g. {{weather: snow}}")
        rule: dict[str, tuple[str, ...]] = {}
        for feature, values in rule_raw.items():
            feature = _scalar(feature, where, source)
            if feature not in features:
                raise ClipengineError(f"{source}: '{where}.{feature}': '{feature}' is not one of the ODD's features "
                                      f"({', '.join(features)})")
            listed = values if isinstance(values, list) else [values]
            if not listed:
                raise ClipengineError(f"{source}: '{where}.{feature}' is an empty list")
            matched = []
            for j, value in enumerate(listed):
                value = _scalar(value, f"{where}.{feature}" + (f"[{j}]" if isinstance(values, list) else ""), source)
                if value not in features[feature]:
                    raise ClipengineError(f"{source}: '{where}.{feature}': '{value}' is not a value of '{feature}' "
                                          f"({', '.join(features[feature])})")
                if value not in matched:
                    matched.append(value)
            rule[feature] = tuple(matched)
        rules.append(rule)
    name = raw.get("name")
    if name is not None:
        name = _scalar(name, "name", source)
    description = raw.get("description")
    if description is not None:
        _scalar(description, "description", source)
    return Odd(features=features, exclude=tuple(rules), source=source, name=name)
