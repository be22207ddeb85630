"""Key paths in the sweep models: ``key.path=value`` overrides and messages for unknown keys."""

from __future__ import annotations

import copy
import types
from collections.abc import Sequence
from functools import cache
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ._problems import Problem, SweepValidationError, _closest, _show
from .models import SweepSpec
from .params import RangeParam
from .yaml_io import _SweepLoader, _yaml_reason


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _as_index(key: str | int) -> int | None:
    if isinstance(key, int):
        return key
    return int(key) if key.isdigit() else None


def _resolve_key(annotation: Any, key: str | int) -> tuple[Any, FieldInfo | None] | None:
    """Return the annotation (and field) of ``key`` inside ``annotation``, or None."""
    annotation = _unwrap(annotation)
    if annotation is Any:
        return Any, None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(key))
        return (field.annotation, field) if field is not None else None
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for member in get_args(annotation):
            found = _resolve_key(member, key)
            if found is not None:
                return found
        return None
    if origin is list:
        return (get_args(annotation)[0], None) if _as_index(key) is not None else None
    if origin is dict:
        return get_args(annotation)[1], None
    return None


def _field_names(annotation: Any) -> list[str]:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    if get_origin(annotation) in (Union, types.UnionType):
        return [name for member in get_args(annotation) for name in _field_names(member)]
    return []


def _annotation_at(loc: Sequence[str | int]) -> Any:
    annotation: Any = SweepSpec
    for key in loc:
        found = _resolve_key(annotation, key)
        if found is None:
            return None
        annotation = found[0]
    return annotation


@cache
def _key_homes() -> dict[str, list[str]]:
    """Map each key of a model section to the paths where it is valid (``training``)."""
    homes: dict[str, list[str]] = {}

    def visit(model: type[BaseModel], path: str) -> None:
        for name, field in model.model_fields.items():
            homes.setdefault(name, []).append(path or "the top level")
            child = _unwrap(field.annotation)
            if get_origin(child) is list:
                child = _unwrap(get_args(child)[0])
                if isinstance(child, type) and issubclass(child, BaseModel):
                    visit(child, f"{path + '.' if path else ''}{name}.N")
                continue
            if get_origin(child) in (Union, types.UnionType):
                members = [_unwrap(member) for member in get_args(child)]
                models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
                child = models[0] if len(models) == 1 and RangeParam not in models else None
            if isinstance(child, type) and issubclass(child, BaseModel) and child is not RangeParam:
                visit(child, f"{path + '.' if path else ''}{name}")

    visit(SweepSpec, "")
    return homes


def _unknown_key_message(key: str | int, parent_annotation: Any) -> str:
    valid = _field_names(parent_annotation)
    if not valid:
        return f"Unknown key {key!r}."
    suggestion = _closest(str(key), valid)
    listing = f"Valid keys here: {', '.join(valid)}."
    if suggestion:
        return f"Unknown key {key!r}. Did you mean {suggestion!r}? {listing}"
    homes = _key_homes().get(str(key))
    if homes:
        return f"Unknown key {key!r} here. It belongs under {' or '.join(homes)}. {listing}"
    return f"Unknown key {key!r}. {listing}"


class _OverrideError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _OverrideError(
            "An override must have the form key.path=value, for example training.epochs=4."
        )
    parts = key.split(".")
    if any(not part for part in parts):
        raise _OverrideError(f"The key path {key!r} has an empty part. Separate keys with one dot.")
    try:
        value = yaml.load(raw, Loader=_SweepLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _OverrideError(
            f"The value {raw!r} is not valid YAML ({_yaml_reason(exc)}). Quote text that "
            f"contains ':', '#', '[' or '{{'."
        ) from None
    return parts, value


def _apply_override(data: dict[str, Any], text: str) -> list[str]:
    """Set one ``key.path=value`` in ``data`` in place and return the key path."""
    parts, value = _parse_override(text)
    annotation: Any = SweepSpec
    node: Any = data
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "the top level"
        if isinstance(node, list):
            index = _as_index(part)
            if index is None:
                raise _OverrideError(
                    f"{here} is a list, so the next key must be an index such as 0, got {part!r}."
                )
            if index >= len(node):
                entries = "1 entry" if len(node) == 1 else f"{len(node)} entries"
                raise _OverrideError(
                    f"Index {index} is out of range: {here} has {entries}. To add entries, "
                    f"set the whole list."
                )
            found = _resolve_key(annotation, index)
            key: str | int = index
        else:
            found = _resolve_key(annotation, part)
            if found is None:
                raise _OverrideError(_unknown_key_message(part, annotation))
            key = part

        if depth == len(parts) - 1:
            node[key] = value
            return parts

        child_annotation, field = found if found is not None else (Any, None)
        child = node[int(key)] if isinstance(node, list) else node.get(key)
        if child is None:
            child = _default_container(field)
            node[key] = child
        if not isinstance(child, (dict, list)):
            path = ".".join(parts[: depth + 1])
            raise _OverrideError(
                f"{path} is the single value {_show(child)}, so it has no key "
                f"{parts[depth + 1]!r}. Set {path}=... to replace the whole value."
            )
        node, annotation = child, child_annotation
    return parts


def _default_container(field: FieldInfo | None) -> Any:
    """Return the plain-data default of a missing section, so that one key can be set."""
    if field is None:
        return {}
    if get_origin(_unwrap(field.annotation)) is list and field.is_required():
        return []
    default = field.get_default(call_default_factory=True, validated_data={})
    if isinstance(default, BaseModel):
        return default.model_dump(mode="json", exclude_none=True)
    if isinstance(default, (dict, list)):
        return copy.deepcopy(default)
    return {}


def _apply_overrides(
    data: dict[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], list[Problem], list[list[str]]]:
    result = copy.deepcopy(data)
    problems = []
    paths = []
    for text in overrides:
        # A failed override must leave no half-made sections behind, so each one is applied
        # to a copy first.
        attempt = copy.deepcopy(result)
        try:
            paths.append(_apply_override(attempt, text))
        except _OverrideError as exc:
            problems.append(Problem(text.partition("=")[0].strip(), text, exc.message))
            continue
        result = attempt
    return result, problems, paths


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of a parsed sweep file with ``key.path=value`` overrides applied.

    Values are parsed as YAML (``families=[mmts]`` is a list, ``epochs=4`` an int). An
    integer key indexes a list (``datasets.0.imbalance_ratio=20``). A key may be absent
    from the file as long as the sweep models define it: a missing section starts from its
    defaults (``schedule.tau.low=0.05`` keeps the default ``high``).

    Raises:
        SweepValidationError: one problem per override with an unknown key (naming the
            closest valid key), an index out of range or a value that is not valid YAML.
    """
    result, problems, _ = _apply_overrides(data, overrides)
    if problems:
        raise SweepValidationError(problems, source="--set overrides")
    return result
