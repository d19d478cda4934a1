"""Prompt templates as data: the wording of the entity-tracking and variable-binding prompts, so a model with its
own format (lower case, spaced punctuation, another language) gets prompts it can read, and every named position
follows the wording.

    template = EntityTemplate(segment="the {object} is in box {label}", separator=" , ", context_end=" .",
                              query=" box {label} contains the", capitalize=False)
    template = load_entity_template("my_format.json")       # the same fields as a JSON object
    vb = VB_TEMPLATES["authors"]                              # "x = 12\\ny = 40\\nx + y = " (Davies et al.'s code)

An entity prompt is prefix + segment_0 + separator + segment_1 ... + context_end + query; the answer is
answer_prefix + the queried object. A program is assignment_0 + separator + assignment_1 ... + query; its answer is
answer_prefix + the first digit of the result. The defaults are this project's formats, byte for byte.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_FIELD = re.compile(r"\{([^{}]*)\}")


def _check_placeholders(cls: str, field: str, text: str, needed: Sequence[str]) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{cls}.{field} must be a string, got {type(text).__name__}")
    found = _FIELD.findall(text)
    unknown = sorted(set(found) - set(needed))
    if unknown:
        raise ValueError(f"{cls}.{field}={text!r} has unknown placeholder(s) {unknown}; it may use only "
                         + ", ".join("{" + n + "}" for n in needed))
    for name in needed:
        if found.count(name) != 1:
            raise ValueError(f"{cls}.{field}={text!r} must contain {{{name}}} exactly once "
                             f"(found {found.count(name)})")


@dataclass(frozen=True)
class EntityTemplate:
    """The wording of an entity-tracking prompt (Prakash et al.'s boxes task).

    Fields: segment (one box: must hold {object} and {label} once), separator (between segments), prefix (text
    before the first segment), context_end (after the last segment), query (must hold {label} once; the prompt ends
    with it), answer_prefix (put before the object to make the answer: " " for word tokenizers' leading space),
    capitalize (upper-case the context's first letter), objects / labels (the words to use; None = the built-in
    lists), name (recorded in results).
    """

    segment: str = "the {object} is in Box {label}"
    separator: str = ", "
    prefix: str = ""
    context_end: str = "."
    query: str = " Box {label} contains the"
    answer_prefix: str = " "
    capitalize: bool = True
    objects: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    name: str = "default"

    def __post_init__(self) -> None:
        _check_placeholders("EntityTemplate", "segment", self.segment, ("object", "label"))
        _check_placeholders("EntityTemplate", "query", self.query, ("label",))
        for field in ("separator", "prefix", "context_end", "answer_prefix"):
            _check_placeholders("EntityTemplate", field, getattr(self, field), ())
        for field in ("objects", "labels"):
            words = getattr(self, field)
            if words is not None:
                object.__setattr__(self, field, tuple(words))
                if not words or any(not isinstance(w, str) or not w.strip() for w in words):
                    raise ValueError(f"EntityTemplate.{field} must be a non-empty list of non-empty words")

    @property
    def is_default(self) -> bool:
        """Whether this template words prompts exactly as the built-in default."""
        return dataclasses.replace(self, name="default") == EntityTemplate()


@dataclass(frozen=True)
class VarBindTemplate:
    """The wording of a variable-binding program (Davies et al.).

    Fields: assignment (one variable: {name} and {value} once each), separator (between assignments), query (the
    expression: {left}, {op} and {right} once each; the prompt ends with it), answer_prefix (before the answer's
    first digit), names (the variables assigned), name (recorded in results).
    """

    assignment: str = "{name}={value}"
    separator: str = ", "
    query: str = ". {left}{op}{right}="
    answer_prefix: str = ""
    names: tuple[str, ...] = ("x", "y", "z")
    name: str = "default"

    def __post_init__(self) -> None:
        _check_placeholders("VarBindTemplate", "assignment", self.assignment, ("name", "value"))
        _check_placeholders("VarBindTemplate", "query", self.query, ("left", "op", "right"))
        for field in ("separator", "answer_prefix"):
            _check_placeholders("VarBindTemplate", field, getattr(self, field), ())
        object.__setattr__(self, "names", tuple(self.names))
        if len(self.names) < 2 or len(set(self.names)) != len(self.names):
            raise ValueError(f"VarBindTemplate.names must be at least two distinct variable names, got {self.names}")


VB_TEMPLATES = {
    "default": VarBindTemplate(),
    # Nix07/binding-circuit-discovery: "x = {x}\ny = {y}\nx {op} y = " (PAPERS.md section 3)
    "authors": VarBindTemplate(assignment="{name} = {value}", separator="\n", query="\n{left} {op} {right} = ",
                               names=("x", "y"), name="authors"),
}
"""Built-in variable-binding formats: this project's ("x=12, y=40, z=73. y-x=") and the authors' code's."""


def _from_dict(cls: type, data: dict, source: str):
    if not isinstance(data, dict):
        raise ValueError(f"{source}: an {cls.__name__} is a JSON object of fields, got {type(data).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; valid fields: {', '.join(fields)}")
    return cls(**data)


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"template file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"template file {str(path)!r} is not valid JSON: {err}") from err


def load_entity_template(source: str | Path | dict | EntityTemplate | None) -> EntityTemplate:
    """An EntityTemplate from itself, a dict of fields, a JSON file, or None / "default" (the built-in wording)."""
    if source is None or source == "default":
        return EntityTemplate()
    if isinstance(source, EntityTemplate):
        return source
    if isinstance(source, dict):
        return _from_dict(EntityTemplate, source, "entity template")
    data = _read_json(source)
    if isinstance(data, dict):
        data.setdefault("name", Path(source).stem)
    return _from_dict(EntityTemplate, data, str(source))


def load_vb_template(source: str | Path | dict | VarBindTemplate | None) -> VarBindTemplate:
    """A VarBindTemplate from itself, a dict, a built-in name (VB_TEMPLATES: "default", "authors") or a JSON file."""
    if source is None:
        return VB_TEMPLATES["default"]
    if isinstance(source, VarBindTemplate):
        return source
    if isinstance(source, dict):
        return _from_dict(VarBindTemplate, source, "variable-binding template")
    if str(source) in VB_TEMPLATES:
        return VB_TEMPLATES[str(source)]
    if not Path(source).is_file():
        raise ValueError(f"{str(source)!r} is neither a built-in variable-binding template "
                         f"({', '.join(VB_TEMPLATES)}) nor a template file")
    data = _read_json(source)
    if isinstance(data, dict):
        data.setdefault("name", Path(source).stem)
    return _from_dict(VarBindTemplate, data, str(source))


def template_to_dict(template: EntityTemplate | VarBindTemplate) -> dict:
    """The template's fields as plain JSON values (the form load_*_template reads back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(template).items()}
