"""Removal of credentials from text before it reaches MLflow, artifacts or logs."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# MLflow accepts up to 6000 characters per param value (3.x) and 500 in older servers;
# 500 keeps a sweep loggable on both.
MAX_PARAM_VALUE_LENGTH = 500
MAX_TAG_VALUE_LENGTH = 5000
MAX_KEY_LENGTH = 250

# Environment variables whose values are credentials. Only their values are used, to mask
# them wherever they appear in text; neither names nor values are ever logged.
_SECRET_ENV_NAME = re.compile(
    r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE
)
# Values shorter than this are common words ("testing", "admin"); masking them everywhere
# would garble ordinary text while protecting nothing.
_MIN_ENV_SECRET_LENGTH = 8

_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s@?#]+)@")
_SECRET_NAME = (
    r"[\w.\-]*(?:secret|password|passwd|pwd|token|api[_\-]?key|access[_\-]?key(?:[_\-]?id)?"
    r"|private[_\-]?key|credentials?|signature|sig)"
)
_QUERY_SECRET = re.compile(rf"(?i)([?&;]{_SECRET_NAME}=)([^&#\s]+)")
_ASSIGNED_SECRET = re.compile(
    rf"(?i)(\b{_SECRET_NAME}[\"']?\s*[=:]\s*[\"']?)([^\s\"',;&}}\]]+)"
)
_AUTH_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[=:]\s*[\"']?(?:bearer|basic|token)?\s*)"
                          r"([^\s\"',;]+)")
_AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
_AWS_SECRET_KEY = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    if ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        return f"{match.group('scheme')}{user}:{MASK}@"
    # A lone userinfo part is usually a token (https://TOKEN@host).
    return f"{match.group('scheme')}{MASK}@"


def _mask_aws_secret_key(match: re.Match[str]) -> str:
    # A 40-character AWS secret key mixes upper case, lower case and digits; a git commit
    # or SHA-1 digest (lower-case hex) must survive.
    text = match.group(0)
    has_upper = any(c.isupper() for c in text)
    has_lower = any(c.islower() for c in text)
    has_digit = any(c.isdigit() for c in text)
    return MASK if has_upper and has_lower and has_digit else text


def _environment_names() -> list[str]:
    # MLflow's telemetry thread sets and removes variables while this runs, which makes
    # iterating os.environ raise, so the copy of the names is retried.
    for _ in range(5):
        try:
            return list(os.environ)
        except RuntimeError:
            continue
    return list(os.environ)


def _secret_env_values() -> list[str]:
    values = []
    for name in _environment_names():
        value = os.environ.get(name)
        if (value is not None and _SECRET_ENV_NAME.search(name)
                and len(value) >= _MIN_ENV_SECRET_LENGTH):
            values.append(value)
    # Longest first, so that a secret that contains another is masked whole.
    return sorted(set(values), key=len, reverse=True)


def redact(text: Any) -> str:
    """Return ``text`` as a string with credentials replaced by ``***``.

    Masked are: passwords and tokens in URL user info (``postgresql://user:***@host``),
    secret query parameters (``?token=***``), and ``name=value`` or ``name: value`` pairs
    whose name ends in a secret word (password, token, secret, access_key, ...). So are
    authorization headers, AWS access key ids and secret keys, and the literal values
    (8 or more characters) of credential environment variables such as
    ``AWS_SECRET_ACCESS_KEY`` and ``MLFLOW_TRACKING_TOKEN``.

    Args:
        text: any value; non-strings are converted with ``str``.

    Returns:
        The text with every recognized secret masked.
    """
    result = text if isinstance(text, str) else str(text)
    for secret in _secret_env_values():
        result = result.replace(secret, MASK)

    result = _URL_USERINFO.sub(_mask_userinfo, result)
    result = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, result)
    result = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, result)
    result = _ASSIGNED_SECRET.sub(lambda m: m.group(1) + MASK, result)
    result = _AWS_ACCESS_KEY_ID.sub(MASK, result)
    return _AWS_SECRET_KEY.sub(_mask_aws_secret_key, result)


def is_secret_name(name: str) -> bool:
    """Return True when a parameter or field name denotes a credential."""
    return re.fullmatch(rf"(?i){_SECRET_NAME}", name) is not None


_INVALID_KEY_CHARACTERS = re.compile(r"[^/\w.\- :]")


def sanitize_key(key: str) -> str:
    """Return an MLflow-valid metric, param or tag key for ``key``.

    MLflow keys may contain alphanumerics, ``_ - . / :`` and spaces, must not normalize
    to another path and are limited to 250 characters. Invalid characters become ``_``;
    a key that is too long is cut and ends with a short hash of the full key.
    """
    cleaned = _INVALID_KEY_CHARACTERS.sub("_", str(key))
    cleaned = re.sub(r"/{2,}", "/", cleaned).strip("/")
    cleaned = re.sub(r"(^|/)\.{1,2}(?=/|$)", r"\1_", cleaned) or "_"
    if len(cleaned) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(cleaned.encode()).hexdigest()[:8]
        cleaned = f"{cleaned[: MAX_KEY_LENGTH - 9]}~{digest}"
    return cleaned


def truncate(value: str, limit: int) -> str:
    """Return ``value`` cut to ``limit`` characters, ending in ``...`` when cut."""
    return value if len(value) <= limit else value[: limit - 3] + "..."


def format_value(value: Any) -> str:
    """Return the string MLflow stores for a param or tag value (JSON for lists/dicts)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def param_value(value: Any) -> str:
    """Return ``value`` formatted, redacted and cut to the param length limit."""
    return truncate(redact(format_value(value)), MAX_PARAM_VALUE_LENGTH)


def tag_value(value: Any) -> str:
    """Return ``value`` formatted, redacted and cut to the tag length limit."""
    return truncate(redact(format_value(value)), MAX_TAG_VALUE_LENGTH)


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into dotted MLflow params with safe string values.

    Nested mappings give dotted keys (``training.lr``); list items that are mappings
    are indexed (``datasets.0.name``); other lists become JSON strings. Values are
    redacted and cut to 500 characters, and the value of a key that names a credential
    (``password``, ``token``, ...) is replaced by ``***`` whatever it contains.

    Args:
        data: the mapping, for example ``SweepSpec.model_dump(mode="json")``.
        prefix: key prefix of this level, without the trailing dot.

    Returns:
        Key to value, keys sanitized for MLflow.
    """
    flat: dict[str, str] = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, key))
        elif isinstance(value, (list, tuple)) and value and all(
            isinstance(item, Mapping) for item in value
        ):
            for index, item in enumerate(value):
                flat.update(flatten_params(item, f"{key}.{index}"))
        elif is_secret_name(str(raw_key)) and value not in (None, ""):
            flat[sanitize_key(key)] = MASK
        else:
            flat[sanitize_key(key)] = param_value(value)
    return flat
