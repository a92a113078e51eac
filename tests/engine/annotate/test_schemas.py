"""Schema loading: expansion, defaults, hashing, and one clear message per mistake."""

from __future__ import annotations

import textwrap

import pytest

from clipengine.annotate.schemas import BUILTIN_SCHEMAS, STRATEGIES, load_schema, parse_schema
from clipengine.errors import ClipengineError

BRIEF_EXAMPLE = """
attributes:
  hair_color:                 # exclusive by default: one class per item
    templates: ["a photo of a person with {} hair", "a close-up photo of a person with {} hair"]
    classes:
      black: ["black", "dark"]          # fill-ins for the templates
      blond: ["blond", "blonde"]
  eyeglasses:
    classes:
      "yes": {prompts: ["a photo of a person wearing eyeglasses"]}   # prompts written out
      "no": {prompts: ["a photo of a person without glasses", "a face with bare eyes"]}
"""


def test_brief_example_expands_templates_over_fill_ins():
    schema = parse_schema(BRIEF_EXAMPLE, source="example.yaml", default_name="example")
    assert schema.name == "example"
    assert schema.attribute_names == ("hair_color", "eyeglasses")
    hair = schema.attribute("hair_color")
    assert hair.class_names == ("black", "blond")
    assert hair.classes[0].prompts == (
        "a photo of a person with black hair",
        "a photo of a person with dark hair",
        "a close-up photo of a person with black hair",
        "a close-up photo of a person with dark hair",
    )
    glasses = schema.attribute("eyeglasses")
    assert glasses.kind == "binary" and glasses.positive == "yes"
    assert glasses.classes[1].prompts == ("a photo of a person without glasses", "a face with bare eyes")
    assert all(a.strategy == "mean" for a in schema.attributes)
    assert len(schema.prompts()) == 4 + 4 + 1 + 2
    assert len(schema.hash) == 16


def test_hash_follows_content_not_formatting():
    a = parse_schema(BRIEF_EXAMPLE)
    reformatted = parse_schema(
        "name: other\nattributes:\n"
        "  hair_color:\n    templates: ['a photo of a person with {} hair', 'a close-up photo of a person with {} hair']\n"
        "    classes: {black: [black, dark], blond: [blond, blonde]}\n"
        "  eyeglasses:\n    classes:\n"
        "      'yes': {prompts: ['a photo of a person wearing eyeglasses']}\n"
        "      'no': {prompts: ['a photo of a person without glasses', 'a face with bare eyes']}\n"
    )
    assert a.hash == reformatted.hash
    changed = parse_schema(BRIEF_EXAMPLE.replace("bare eyes", "naked eyes"))
    assert changed.hash != a.hash
    assert a.with_strategy("max").hash != a.hash
    assert a.with_strategy("mean").hash == a.hash


def test_class_forms_defaults_and_overrides():
    schema = parse_schema(
        textwrap.dedent(
            """
            strategy: topm
            top_m: 2
            templates: ["a photo of {}"]
            attributes:
              age:
                type: exclusive
                strategy: logsumexp
                classes:
                  child: a child
                  adult: {fill: [an adult, a grown-up], prompts: ["a person of working age"]}
                  elderly: {templates: ["an old photo of {}"], fill: [a senior]}
              vest:
                positive: worn
                classes:
                  worn: {prompts: [a hi-vis vest]}
                  absent: {prompts: [ordinary clothes]}
            """
        )
    )
    age, vest = schema.attributes
    assert age.kind == "exclusive" and age.strategy == "logsumexp" and age.top_m == 2
    assert age.classes[0].prompts == ("a photo of a child",)
    assert age.classes[1].prompts == ("a photo of an adult", "a photo of a grown-up", "a person of working age")
    assert age.classes[2].prompts == ("an old photo of a senior",)
    assert vest.kind == "binary" and vest.positive == "worn" and vest.strategy == "topm"
    overridden = schema.with_strategy("naive", {"vest": "max"})
    assert overridden.strategies == {"age": "naive", "vest": "max"}


@pytest.mark.parametrize("name", BUILTIN_SCHEMAS)
def test_builtin_schemas_load(name):
    schema = load_schema(name)
    assert schema.name == name
    assert all(len(c.prompts) >= 2 for a in schema.attributes for c in a.classes), "built-ins use ensembles"
    for attribute in schema.attributes:
        assert attribute.strategy in STRATEGIES


def test_builtin_contents():
    celeba = load_schema("celeba")
    assert celeba.attribute_names == (
        "young", "male", "pale_skin", "hair_color", "eyeglasses", "hat", "bald", "goatee", "beard", "smiling",
    )
    assert celeba.attribute("hair_color").class_names == ("black", "blond", "gray", "brown")
    fashion = load_schema("fashion")
    assert fashion.attribute("garment").class_names == (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )
    assert {"tone", "pattern", "sleeve_length"} <= set(fashion.attribute_names)
    pedestrian = load_schema("pedestrian")
    assert pedestrian.attribute("age_group").class_names == ("child", "adult", "elderly")
    assert {"gender", "clothing_color", "carried_object", "high_visibility_vest", "occlusion", "sharpness", "lighting"} <= set(
        pedestrian.attribute_names
    )
    assert load_schema("scene").attribute_names == ("weather", "time_of_day", "road_type")


def test_loads_a_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(BRIEF_EXAMPLE)
    schema = load_schema(path)
    assert schema.name == "mine" and schema.hash == parse_schema(BRIEF_EXAMPLE).hash
    assert load_schema(str(path)).source == str(path)


BAD = [
    ("attributes: [", "not valid YAML: line"),
    ("- a\n- b\n", "needs a top-level 'attributes' mapping"),
    ("attributes: {}\n", "'attributes' must be a non-empty mapping"),
    ("colour: x\nattributes: {a: {classes: {x: {prompts: [p]}, y: {prompts: [q]}}}}\n", "unknown key 'colour'"),
    ("attributes: {a: {classes: {x: {prompts: [p]}, y: {prompts: [q]}}, templates2: []}}\n", "attribute 'a': unknown key 'templates2'"),
    ("attributes: {a: {templates: ['{} x']}}\n", "attribute 'a': missing 'classes'"),
    ("attributes: {a: {classes: {x: {prompts: [p]}}}}\n", "attribute 'a': needs at least two classes"),
    ("attributes: {a: {classes: {x: [red], y: [blue]}}}\n", "class 'x': fill-ins ['red'] given but the attribute has no 'templates'"),
    ("attributes: {a: {templates: ['a photo'], classes: {x: [red], y: [blue]}}}\n", "template 'a photo' must contain '{}' exactly once"),
    ("attributes: {a: {templates: ['{} {}'], classes: {x: [red], y: [blue]}}}\n", "must contain '{}' exactly once"),
    ("attributes: {a: {strategy: best, classes: {x: {prompts: [p]}, y: {prompts: [q]}}}}\n", "attribute 'a': unknown strategy 'best'"),
    ("attributes: {a: {classes: {x: {prompts: []}, y: {prompts: [q]}}}}\n", "class 'x': 'prompts' must be a non-empty list"),
    ("attributes: {a: {classes: {x: {prompts: [p], colour: 1}, y: {prompts: [q]}}}}\n", "class 'x': unknown key 'colour'"),
    ("attributes: {a: {classes: {x: , y: {prompts: [q]}}}}\n", "class 'x': no prompts"),
    ("attributes: {a: {classes: {yes: {prompts: [p]}, no: {prompts: [q]}}}}\n", "parsed as the YAML boolean True; quote it"),
    ("attributes: {a: {type: binary, classes: {x: {prompts: [p]}, y: {prompts: [q]}, z: {prompts: [r]}}}}\n", "a binary attribute has exactly two classes, got 3"),
    ("attributes: {a: {positive: w, classes: {x: {prompts: [p]}, y: {prompts: [q]}}}}\n", "positive class 'w' is not one of its classes"),
    ("attributes: {a: {type: multi, classes: {x: {prompts: [p]}, y: {prompts: [q]}}}}\n", "unknown type 'multi'"),
    ("attributes: {a: {classes: {x: {prompts: [p]}, y: {prompts: [p]}}}}\n", "prompt 'p' describes both 'x' and 'y'"),
    ("attributes: {a: {top_m: 0, classes: {x: {prompts: [p]}, y: {prompts: [q]}}}}\n", "'top_m' must be an integer from 1 to 32"),
    ("attributes: {a-b: {classes: {x: {prompts: [p]}, y: {prompts: [q]}}}}\n", "attribute 'a-b': the name must be letters"),
    ("attributes: {path: {classes: {x: {prompts: [p]}, y: {prompts: [q]}}}}\n", "collides with a metadata column"),
    ("attributes: {a: {classes: {x: {prompts: [p]}, y: {prompts: [q]}}}, a: {classes: {x: {prompts: [p]}, y: {prompts: [q]}}}}\n", "duplicate key 'a'"),
    ("attributes: {a: {classes: [x, y]}}\n", "'classes' must be a non-empty mapping"),
    ("attributes: {a: [x, y]}\n", "attribute 'a': must be a mapping"),
    ("attributes: {a: {truth: 3, classes: {x: {prompts: [p]}, y: {prompts: [q]}}}}\n", "'truth' must be a column spec"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_each_mistake_has_a_one_line_message_naming_file_and_attribute(text, message):
    with pytest.raises(ClipengineError) as info:
        parse_schema(text, source="bad.yaml")
    text_of_error = str(info.value)
    assert message in text_of_error
    assert text_of_error.startswith("bad.yaml")
    assert "\n" not in text_of_error


def test_unknown_schema_name():
    with pytest.raises(ClipengineError, match="unknown schema 'celebb': not a built-in"):
        load_schema("celebb")


def test_bad_strategy_override():
    schema = parse_schema(BRIEF_EXAMPLE)
    with pytest.raises(ClipengineError, match="unknown strategy 'median'"):
        schema.with_strategy("median")
    with pytest.raises(ClipengineError, match="no attribute 'hat'"):
        schema.with_strategy(None, {"hat": "max"})
