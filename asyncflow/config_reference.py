"""The config reference: every field of the run config as Markdown, generated from the pydantic models.

`asyncflow config --reference` prints it and `docs/config.md` is its output, checked by
tests/test_config_reference.py so the page cannot drift from the code. A field's description is
its attribute docstring in asyncflow/config.py (read from the source, the way pydantic's
`use_attribute_docstrings` would), a section's is its class docstring.

    .venv/bin/asyncflow config --reference > docs/config.md
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from asyncflow.config import Config

GENERATE_COMMAND = "asyncflow config --reference > docs/config.md"

_INTRO = f"""\
# Config reference

<!-- Generated from the pydantic models in asyncflow/config.py by `{GENERATE_COMMAND}`.
     Do not edit by hand: tests/test_config_reference.py fails when this page is out of date. -->

One YAML file describes a whole run. Sections and fields are listed below with their type,
default and meaning; a section left out takes its defaults, and unknown keys are rejected (they
are typos far more often than intent). `model`, `data` and `reward` have required fields, so a
config names at least those:

```yaml
run: {{name: arith, steps: 20}}
model: {{path: runs/models/tiny-arith}}
data: {{path: runs/data/arith.jsonl}}
reward: {{function: "examples.arith:reward"}}
```

- `asyncflow config CONFIG [--set field.path=value ...]` prints the resolved config (what the
  actors read: overrides applied, paths made absolute, defaults filled in).
- `--set` takes a dotted field path and a YAML value, on `run` and `config` alike:
  `--set run.steps=3 --set rollout.engine.type=vllm`.
- Engine sections (`rollout.engine`, `trainer.engine`) are chosen by `type`; each type has its
  own fields, listed in its own table. An engine section without `type` means `hf`.
"""


@dataclass(frozen=True)
class FieldDoc:
    """One row of the reference."""

    path: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class SectionDoc:
    """One table: the fields of one model at `path` (`rollout.engine` with `type: vllm`, ...)."""

    path: str
    model: type[BaseModel]
    title: str
    description: str
    fields: tuple[FieldDoc, ...]


def reference_markdown() -> str:
    """The whole reference page (docs/config.md)."""
    parts = [_INTRO]
    for section in sections():
        parts.append(f"\n## {section.title}\n")
        if section.description:
            parts.append(f"\n{section.description}\n")
        parts.append("\n| field | type | default | description |\n|---|---|---|---|\n")
        for row in section.fields:
            parts.append(f"| `{row.path}` | {_cell(row.type)} | {_cell(row.default)} | {_cell(row.description)} |\n")
    return "".join(parts)


def sections(model: type[BaseModel] = Config, path: str = "") -> Iterator[SectionDoc]:
    """Every table of the reference, depth first: a model's own scalar fields, then its sub-sections."""
    scalars: list[FieldDoc] = []
    nested: list[tuple[str, type[BaseModel], str | None]] = []
    for name, info in model.model_fields.items():
        dotted = f"{path}.{name}" if path else name
        members = _model_members(info.annotation)
        if members:
            variant = len(members) > 1
            for member in members:
                nested.append((dotted, member, _discriminator_value(member, info) if variant else None))
        else:
            scalars.append(FieldDoc(dotted, render_type(info.annotation, info.metadata), render_default(info),
                                    field_docstrings(model).get(name, "")))
    # An engine's `type` (the discriminator) leads its table, before the fields it inherits.
    scalars.sort(key=lambda row: row.path.rsplit(".", 1)[-1] != "type")
    if scalars:
        title = f"`{path}`" if path else "top level"
        yield SectionDoc(path, model, title, _class_doc(model), tuple(scalars))
    for dotted, member, variant in nested:
        if variant is None:
            yield from sections(member, dotted)
        else:
            for section in sections(member, dotted):
                if section.path == dotted:
                    title = f"`{dotted}` with `type: {variant}`"
                    description = _class_doc(member) or field_docstrings(member).get("type", "")
                    section = SectionDoc(section.path, member, title, description, section.fields)
                yield section


def all_fields() -> list[tuple[str, type[BaseModel], str]]:
    """(dotted path, model, field name) of every leaf field the reference covers."""
    out = []
    for section in sections():
        for row in section.fields:
            out.append((row.path, section.model, row.path.rsplit(".", 1)[-1]))
    return out


def _model_members(annotation: Any) -> list[type[BaseModel]]:
    """The model(s) a field holds: one for a section, several for a discriminated union, none for a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        if args and all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            return list(args)
    return []


def _discriminator_value(member: type[BaseModel], info: FieldInfo) -> str:
    key = info.discriminator if isinstance(info.discriminator, str) else "type"
    default = member.model_fields[key].default
    return str(default)


# -- docstrings ---------------------------------------------------------------------------------

@cache
def field_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """Field name → attribute docstring (the string literal right under the field), own and inherited."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for statement, following in zip(body, body[1:], strict=False):
            target = statement.target if isinstance(statement, ast.AnnAssign) else None
            if (isinstance(target, ast.Name) and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
                docs[target.id] = _one_paragraph(following.value.value)
    return docs


def _class_doc(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")  # not inherited: a base's docstring does not describe a section
    return _one_paragraph(doc) if doc else ""


def _one_paragraph(text: str) -> str:
    return " ".join(inspect.cleandoc(text).split())


# -- types and defaults -------------------------------------------------------------------------

_NAMES = {str: "str", int: "int", float: "float", bool: "bool", Path: "path", type(None): "null", Any: "any"}


def render_type(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A short, YAML-minded type: `int ≥ 1`, `"float32" | "bfloat16"`, `path | null`, `list[int]`."""
    text = _type_name(annotation)
    limits = []
    for item in metadata or []:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attr, None)
            if isinstance(item, annotated_types.BaseMetadata) and value is not None:
                limits.append(f"{symbol} {value}")
        pattern = getattr(item, "pattern", None)
        if pattern:
            limits.append(f"matching `{pattern}`")
    return ", ".join([text, *limits])


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(value) for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in get_args(annotation))
    if origin in (list, tuple, dict, set):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(annotation))}]"
    if annotation in _NAMES:
        return _NAMES[annotation]
    return getattr(annotation, "__name__", str(annotation))


def render_default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return f"`{json.dumps(_plain(value.model_dump(mode='json', exclude_defaults=True)))}`"
    return f"`{json.dumps(_plain(value))}`"


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return str(value)  # masked: '**********'
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, one line."""
    return text.replace("|", "\\|").replace("\n", " ")
