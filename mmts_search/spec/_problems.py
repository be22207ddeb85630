"""Problems of a sweep file, the error that lists them, and helpers that format them."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import yaml
from pydantic import BaseModel, ValidationInfo

# Validation context key: when set, the models skip their consistency checks, and
# `parse_sweep` runs them itself to collect every problem with its full key path.
_DEFER_CHECKS = "mmts_defer_checks"


@dataclass(frozen=True)
class Problem:
    """One invalid value of a sweep file.

    Attributes:
        path: dotted key path, such as ``schedule.tau_min.low`` or ``datasets.0.name``,
            or empty for a problem with the whole file (YAML syntax, empty file).
        value: the offending value as read (None for a missing key).
        message: plain-English sentences that state what is wrong, what is allowed and
            what to do.
        line: 1-based line in the sweep file, when the key comes from the file.
    """

    path: str
    value: Any
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path or "(file)"
        if self.line is not None:
            where = f"{where} (line {self.line})"
        return f"{where}: {self.message}"


class SweepValidationError(ValueError):
    """A sweep file, its overrides or its resource requests are invalid.

    Attributes:
        problems: every problem found, ordered by line in the file where known.
        source: the file name or ``<string>``.
    """

    def __init__(
        self, problems: Sequence[Problem], *, source: str = "<string>", title: str | None = None
    ) -> None:
        self.problems = list(problems)
        self.source = source
        self.title = title or f"Invalid sweep file {source}"
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.problems)
        header = f"{self.title} ({count} problem{'' if count == 1 else 's'}):"
        return "\n".join([header, *(f"  - {problem}" for problem in self.problems)])


def _show(value: Any) -> str:
    """Format a value the way it would appear in a YAML file, shortened to 80 characters."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (dict, list, tuple)):
        try:
            dumped = yaml.safe_dump(
                list(value) if isinstance(value, tuple) else value,
                default_flow_style=True,
                width=1_000_000,
                sort_keys=False,
            )
            text = dumped.strip()
        except yaml.YAMLError:
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _format_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _prefixed(problems: Iterable[Problem], prefix: str) -> list[Problem]:
    return [
        replace(problem, path=f"{prefix}.{problem.path}" if problem.path else prefix)
        for problem in problems
    ]


def _checks_deferred(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(_DEFER_CHECKS))


def _raise_problems(problems: list[Problem]) -> None:
    """Raise one ValueError that lists all problems (for models built in Python)."""
    if problems:
        raise ValueError(" ".join(str(problem) for problem in problems))
