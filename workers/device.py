"""Choice of the torch device a trial trains on (`training.device` in the sweep file)."""

from __future__ import annotations

import re

import torch

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a `training.device` value.

    Args:
        name: ``"auto"`` (the current CUDA device when CUDA is available, else the CPU),
            ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ValueError: for any other value, or for a CUDA device that this machine lacks.
    """
    value = name.strip().lower()
    if not _DEVICE_PATTERN.match(value):
        raise ValueError(
            f"training.device must be auto, cpu, cuda or cuda:N but got {name!r}"
        )

    if value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")

    if not torch.cuda.is_available():
        raise ValueError(
            f"training.device is {name!r} but CUDA is not available on this machine "
            f"(torch {torch.__version__}); use 'auto' or 'cpu'"
        )
    device = torch.device(value)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"training.device is {name!r} but this machine has {count} CUDA device(s) "
            f"(valid indices 0 to {count - 1})"
        )
    return device
