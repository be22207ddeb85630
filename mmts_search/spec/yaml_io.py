"""YAML reading with the line of every key path, and YAML writing of a sweep (`dump_sweep`)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from mmts_search.schedules import FAMILY_PARAMETERS

from ._problems import Problem, SweepValidationError
from .constants import _SCHEDULE_PARAMETERS, _SOURCE_FIELDS
from .models import ScheduleSpace, SweepSpec


class _SweepLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` and ``2E5`` as floats, as YAML 1.2 does."""


_SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if not context:
        return str(problem)
    context_mark = getattr(exc, "context_mark", None)
    problem_mark = getattr(exc, "problem_mark", None)
    if context_mark is not None and (
        problem_mark is None or context_mark.line != problem_mark.line
    ):
        context = f"{context} that starts at line {context_mark.line + 1}"
    return f"{problem} ({context})"


def _yaml_syntax_problem(exc: yaml.YAMLError, text: str) -> Problem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    reason = _yaml_reason(exc)
    if mark is None:
        return Problem("", None, f"Invalid YAML: {reason}.")
    line_text = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
    hint = (
        " Indent with spaces, not tabs."
        if "\t" in line_text
        else (" Check the indentation, the colons and the quotes on this line and the one above.")
    )
    return Problem(
        "",
        line_text.strip(),
        f"Invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {reason}.{hint}",
        line=mark.line + 1,
    )


def _node_lines(
    node: yaml.Node, path: tuple[str, ...], lines: dict[str, int], problems: list[Problem]
) -> None:
    """Record the line of every key path under ``node`` and report duplicate keys."""
    if len(path) > 32:
        return
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            child = (*path, key)
            if key in first_line:
                problems.append(
                    Problem(
                        ".".join(child),
                        key,
                        f"Duplicate key {key!r}, first at line {first_line[key]}. YAML keeps "
                        f"only the last value, so remove one of them.",
                        line=line,
                    )
                )
            first_line.setdefault(key, line)
            lines[".".join(child)] = line
            _node_lines(value_node, child, lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, str(index))
            lines[".".join(child)] = item.start_mark.line + 1
            _node_lines(item, child, lines, problems)


def _read_yaml(text: str) -> tuple[Any, dict[str, int], list[Problem]]:
    """Parse YAML text and return the data, the line of each key path and duplicate keys.

    Raises:
        SweepValidationError: the text is not valid YAML (no source name yet).
    """
    loader = _SweepLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise SweepValidationError([_yaml_syntax_problem(exc, text)]) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _node_lines(node, (), lines, problems)
    return data, lines, problems


def dump_sweep(spec: SweepSpec, *, comment: str | None = None) -> str:
    """Write a sweep as YAML that `parse_sweep` reads back to an equal spec.

    Keys left at None are omitted, as are the fields of other dataset sources and the
    schedule parameters that no listed family reads and that keep their defaults.

    Args:
        spec: the sweep to write.
        comment: optional text written as ``#`` comment lines at the top.
    """
    data = spec.model_dump(mode="json", exclude_none=True)

    for dataset_data, dataset in zip(data["datasets"], spec.datasets, strict=True):
        for source, fields in _SOURCE_FIELDS.items():
            if source != dataset.source:
                for field_name in fields:
                    dataset_data.pop(field_name, None)

    used = {name for family in spec.schedule.families for name in FAMILY_PARAMETERS[family]}
    defaults = ScheduleSpace()
    for name in _SCHEDULE_PARAMETERS:
        if name not in used and getattr(spec.schedule, name) == getattr(defaults, name):
            data["schedule"].pop(name, None)

    for name, value in data["schedule"].items():
        data["schedule"][name] = _flow_style(value)
    body = yaml.dump(
        _flow_style_lists(data), Dumper=_SweepDumper, sort_keys=False, default_flow_style=False
    )
    if not comment:
        return body
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    return header + body


class _FlowDict(dict):  # type: ignore[type-arg]
    """A mapping that `dump_sweep` writes on one line, such as a range."""


class _FlowList(list):  # type: ignore[type-arg]
    """A list of scalars that `dump_sweep` writes on one line."""


class _SweepDumper(yaml.SafeDumper):
    """SafeDumper that writes `_FlowDict` and `_FlowList` in flow style."""


_SweepDumper.add_representer(
    _FlowDict,
    lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True),
)
_SweepDumper.add_representer(
    _FlowList,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)


def _flow_style(value: Any) -> Any:
    return _FlowDict(value) if isinstance(value, dict) else value


def _flow_style_lists(value: Any) -> Any:
    """Mark every list of scalars for flow style, recursively."""
    if isinstance(value, _FlowDict):
        return value
    if isinstance(value, dict):
        return {key: _flow_style_lists(item) for key, item in value.items()}
    if isinstance(value, list):
        if all(not isinstance(item, (dict, list)) for item in value):
            return _FlowList(value)
        return [_flow_style_lists(item) for item in value]
    return value
