"""Locations of a sweep's results: a local folder or an ``s3://`` prefix.

A sweep named ``NAME`` with ``storage: STORAGE`` lives in the experiment folder
``STORAGE/NAME``. Ray Tune writes its experiment state, trial folders and checkpoints
there. The driver adds four files of its own, the sweep's *state files*:

- ``sweep.yaml``: the resolved sweep file (overrides applied), read by ``resume``;
- ``optuna.db``: the Optuna study, unless ``search.study_storage`` names a database;
- ``mlflow_parent.json``: the MLflow parent run id, written by the tracking module;
- ``best.yaml``: the best trial as a sweep file that ``mmts-search trial`` accepts.

With local storage the state files sit in the experiment folder itself. With S3 storage
they sit in a local state folder, because SQLite and the tracking module need a local
path. That folder is ``$MMTS_STATE_DIR/NAME-HASH`` (default
``~/.cache/mmts-search/sweeps/NAME-HASH``). HASH comes from the S3 experiment folder, so
two sweeps of one name in different buckets never share a study. Copies go to the S3 experiment
folder when the sweep starts and ends, so that ``resume s3://...`` works from another
machine too.

The S3 endpoint comes from ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or
``MLFLOW_S3_ENDPOINT_URL`` (the first one set). Credentials come from the usual AWS
variables or files, read by pyarrow. They never appear in logs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs

__all__ = [
    "S3_ENDPOINT_VARIABLES",
    "STATE_FILES",
    "SweepLocation",
    "locate_existing_sweep",
    "locate_sweep",
    "s3_filesystem",
]

logger = logging.getLogger(__name__)

S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
STATE_FILES = ("sweep.yaml", "optuna.db", "mlflow_parent.json", "best.yaml")
SWEEP_FILE = "sweep.yaml"


def s3_endpoint() -> str | None:
    """Return the S3 endpoint URL from the environment, or None for AWS itself."""
    for variable in S3_ENDPOINT_VARIABLES:
        value = os.environ.get(variable)
        if value:
            return value
    return None


def s3_filesystem() -> pyarrow.fs.S3FileSystem:
    """Return a pyarrow S3 filesystem for the configured endpoint and region."""
    kwargs: dict[str, object] = {
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        or "us-east-1",
    }
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme and parsed.netloc:
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
        else:
            kwargs["endpoint_override"] = endpoint
    return pyarrow.fs.S3FileSystem(**kwargs)


def local_state_root() -> Path:
    """Return the folder that contains the local state files of S3 sweeps."""
    configured = os.environ.get("MMTS_STATE_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path("~/.cache/mmts-search/sweeps").expanduser()


@dataclass(frozen=True)
class SweepLocation:
    """The experiment folder of one sweep and the local folder of its state files.

    Attributes:
        name: sweep name, the last part of the experiment folder.
        experiment_uri: ``/abs/storage/NAME`` or ``s3://bucket/prefix/NAME``.
        state_dir: local folder of ``sweep.yaml``, ``optuna.db``, ``best.yaml`` and
            ``mlflow_parent.json``; the experiment folder itself for local storage.
    """

    name: str
    experiment_uri: str
    state_dir: Path

    @property
    def is_s3(self) -> bool:
        """Whether the experiment folder is on S3."""
        return self.experiment_uri.startswith("s3://")

    @property
    def storage_uri(self) -> str:
        """The ``storage`` folder that contains the experiment folder."""
        return self.experiment_uri.rsplit("/", 1)[0]

    def filesystem(self) -> pyarrow.fs.FileSystem | None:
        """Return the filesystem Tune must use (S3), or None for the local one."""
        return s3_filesystem() if self.is_s3 else None

    def tune_storage_path(self) -> str:
        """Return ``RunConfig.storage_path``: a path without scheme when on S3."""
        return _strip_scheme(self.storage_uri)

    def tune_experiment_path(self) -> str:
        """Return the experiment path for `Tuner.restore` and `Tuner.can_restore`."""
        return _strip_scheme(self.experiment_uri) if self.is_s3 else self.experiment_uri

    def read_text(self, filename: str) -> str:
        """Read a text file of the experiment folder (S3) or the state folder (local).

        Raises:
            FileNotFoundError: naming the file and the folder.
        """
        if not self.is_s3:
            path = self.state_dir / filename
            if not path.is_file():
                raise FileNotFoundError(f"{filename} not found in {self.state_dir}")
            return path.read_text(encoding="utf-8")

        fs = s3_filesystem()
        remote = f"{_strip_scheme(self.experiment_uri)}/{filename}"
        if fs.get_file_info(remote).type != pyarrow.fs.FileType.File:
            raise FileNotFoundError(f"{filename} not found in {self.experiment_uri}")
        with fs.open_input_stream(remote) as stream:
            return stream.read().decode("utf-8")

    def upload_state(self, filenames: tuple[str, ...] = STATE_FILES) -> None:
        """Copy the local state files that exist to the S3 experiment folder."""
        if not self.is_s3:
            return
        fs = s3_filesystem()
        remote_dir = _strip_scheme(self.experiment_uri)
        fs.create_dir(remote_dir, recursive=True)
        for filename in filenames:
            local = self.state_dir / filename
            if local.is_file():
                with fs.open_output_stream(f"{remote_dir}/{filename}") as stream:
                    stream.write(local.read_bytes())
                logger.debug("sweep %s: uploaded %s to %s", self.name, filename,
                             self.experiment_uri)

    def download_missing_state(self) -> None:
        """Copy the S3 state files that are missing from the local state folder."""
        if not self.is_s3:
            return
        fs = s3_filesystem()
        remote_dir = _strip_scheme(self.experiment_uri)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for filename in STATE_FILES:
            local = self.state_dir / filename
            remote = f"{remote_dir}/{filename}"
            if local.exists() or fs.get_file_info(remote).type != pyarrow.fs.FileType.File:
                continue
            with fs.open_input_stream(remote) as stream:
                local.write_bytes(stream.read())
            logger.info("sweep %s: downloaded %s from %s", self.name, filename,
                        self.experiment_uri)


def locate_sweep(storage: str, name: str) -> SweepLocation:
    """Return the location of a new sweep ``name`` under ``storage``.

    A relative local ``storage`` is resolved against the current folder.
    """
    if storage.startswith("s3://"):
        experiment_uri = f"{storage.rstrip('/')}/{name}"
        return SweepLocation(name, experiment_uri, _s3_state_dir(experiment_uri, name))
    if "://" in storage:
        raise ValueError(f"storage {storage!r} is not supported: use a local folder or "
                         "an s3://bucket/prefix URL")
    experiment_dir = Path(storage).expanduser().resolve() / name
    return SweepLocation(name, str(experiment_dir), experiment_dir)


def locate_existing_sweep(path: str) -> SweepLocation:
    """Return the location of the sweep whose experiment folder is ``path``."""
    if path.startswith("s3://"):
        experiment_uri = path.rstrip("/")
        name = experiment_uri.rsplit("/", 1)[-1]
        return SweepLocation(name, experiment_uri, _s3_state_dir(experiment_uri, name))
    experiment_dir = Path(path).expanduser().resolve()
    return SweepLocation(experiment_dir.name, str(experiment_dir), experiment_dir)


def _s3_state_dir(experiment_uri: str, name: str) -> Path:
    digest = hashlib.sha256(experiment_uri.encode("utf-8")).hexdigest()[:12]
    return local_state_root() / f"{name}-{digest}"


def _strip_scheme(uri: str) -> str:
    return uri[len("s3://"):] if uri.startswith("s3://") else uri
