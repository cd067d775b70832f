"""The on-disk adapter store: immutable numbered versions, an atomic promoted pointer, a cheap change token.

This is the only code that writes under ``<state>/adapters/``. Layout::

    .lock                 fcntl.flock'ed by every writer (server, trainer child, CLI)
    .generation           a counter bumped by every change; the server polls it to hot-swap
    .tmp/                 versions being written and versions being deleted; readers never look here
    <name>/state.json     live state: promoted version, promotion history, status changes, last version number
    <name>/<N>/           adapters.safetensors, adapter_config.json (as mlx-lm writes them), manifest.json,
                          and facts.sqlite when the trainer built a fact graph (format: solverx.adapters.facts)

A version directory is written whole in ``.tmp/``, fsynced and renamed into place, and never modified
afterwards (versions are never updated in place: the stale-output bugs of vLLM #42125 and mlx-lm #229 cannot
happen). Its ``manifest.json`` records provenance and the status it was registered with; later status changes
(promotion, rejection, retirement) live in ``state.json``, which is replaced atomically, so one rename switches
the promoted version and every status together. Readers take no lock. A crashed writer leaves at most a
directory in ``.tmp/`` (which the next writer deletes) or a complete version not yet listed in ``state.json``
(which shows as a candidate).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from solverx.adapters.errors import AdapterConflict, AdapterNotFound, InvalidAdapter, VersionNotFound
from solverx.adapters.facts import FACTS_FILE, FactsError, FactStore
from solverx.adapters.names import NAME_PATTERN, format_model_name, validate_name
from solverx.adapters.validate import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    declared_fingerprint,
    validate_adapter,
)

STAGES = ("cpt", "sft", "imported")
STATUSES = ("candidate", "promoted", "rejected", "retired")

_LOCK = ".lock"
_GENERATION = ".generation"
_TMP = ".tmp"
_STATE = "state.json"
MAX_ADAPTER_BYTES = 512 * 2**20  # the daemon passes its max_adapter_bytes setting (same default)
MAX_CONFIG_BYTES = 1 * 2**20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class VersionInfo:
    """One registered version as readers see it: provenance from its manifest, status from the live state."""

    name: str
    version: int
    path: Path
    base_id: str
    base_fingerprint: str
    stage: str
    parent: int | None
    created: str
    data_hash: str | None
    recipe: dict[str, Any]
    eval_report: dict[str, Any] | None
    status: str
    rank: int
    scale: float
    size_bytes: int
    weights_sha256: str

    @property
    def model_name(self) -> str:
        """The pinned model string, ``<name>@<version>``."""
        return format_model_name(self.name, self.version)

    @property
    def weights_path(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @property
    def config_path(self) -> Path:
        return self.path / ADAPTER_CONFIG


@dataclass
class _State:
    """The mutable part of one adapter, stored in ``<name>/state.json``."""

    last_version: int = 0
    promoted: int | None = None
    history: list[int] = field(default_factory=list)  # promotions, oldest first; the last one is ``promoted``
    status: dict[int, str] = field(default_factory=dict)
    eval_reports: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _State:
        return cls(
            last_version=data.get("last_version", 0),
            promoted=data.get("promoted"),
            history=list(data.get("history", [])),
            status={int(k): v for k, v in data.get("status", {}).items()},
            eval_reports={int(k): v for k, v in data.get("eval_reports", {}).items()},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "last_version": self.last_version,
            "promoted": self.promoted,
            "history": self.history,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "eval_reports": {str(k): v for k, v in sorted(self.eval_reports.items())},
        }

    def forget(self, version: int) -> None:
        self.history = [v for v in self.history if v != version]
        self.status.pop(version, None)
        self.eval_reports.pop(version, None)


class Registry:
    """Adapters and their versions under one root directory; safe to share between processes."""

    def __init__(self, root: Path, max_adapter_bytes: int = MAX_ADAPTER_BYTES) -> None:
        self.root = Path(root)
        self.max_adapter_bytes = max_adapter_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def _check_before_copying(self, source_dir: Path, base_dir: Path, expected_fingerprint: str | None) -> None:
        """What needs no tensor data, checked on the source before a byte is copied (and again on the copy): the
        files are regular files within the size limits, and the header and config fit the base."""
        limits = {ADAPTER_WEIGHTS: self.max_adapter_bytes, ADAPTER_CONFIG: MAX_CONFIG_BYTES}
        for filename, limit in limits.items():
            path = source_dir / filename
            try:
                info = path.lstat()
            except FileNotFoundError:
                raise InvalidAdapter(f"{source_dir}: {filename} is missing") from None
            if not stat.S_ISREG(info.st_mode):
                raise InvalidAdapter(f"{source_dir}: {filename} is not a regular file (links are not followed)")
            if info.st_size > limit:
                raise InvalidAdapter(
                    f"{source_dir}: {filename} is {info.st_size:,} bytes; the limit is {limit:,} bytes "
                    "(max_adapter_bytes)"
                )
        validate_adapter(source_dir, base_dir, expected_fingerprint=expected_fingerprint, read_values=False)

    # -- reading (no lock) ------------------------------------------------------------------------

    def generation(self) -> int:
        """A counter that changes whenever any process registers, promotes, changes or removes anything."""
        try:
            return int((self.root / _GENERATION).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def names(self) -> list[str]:
        """Every adapter with at least one version, sorted."""
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if NAME_PATTERN.fullmatch(entry.name) and entry.is_dir() and self._version_numbers(entry.name)
        )

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, oldest first."""
        state = self._read_state(validate_name(name))
        numbers = self._version_numbers(name)
        if not numbers:
            raise AdapterNotFound(f"adapter {name!r} not found")
        infos = (self._info(name, v, state) for v in numbers)
        return [info for info in infos if info is not None]

    def resolve(self, name: str, version: int | None = None) -> VersionInfo:
        """The version to serve for ``name`` (its promoted one) or ``name@version``."""
        state = self._read_state(validate_name(name))
        if version is None:
            version = state.promoted
            if version is None:
                if not self._version_numbers(name):
                    raise AdapterNotFound(f"adapter {name!r} not found")
                raise VersionNotFound(f"adapter {name!r} has no promoted version; pin one as {name}@<N>")
        info = self._info(name, version, state)
        if info is None:
            if not self._version_numbers(name):
                raise AdapterNotFound(f"adapter {name!r} not found")
            raise VersionNotFound(f"adapter {name!r} has no version {version}")
        return info

    def promoted(self, name: str) -> VersionInfo | None:
        """The promoted version of ``name``; None when none is promoted, AdapterNotFound when ``name`` is unknown."""
        try:
            return self.resolve(name)
        except VersionNotFound:
            return None

    # -- writing (under the lock) -----------------------------------------------------------------

    def register(
        self,
        source_dir: Path,
        name: str,
        *,
        base_id: str,
        base_dir: Path,
        stage: str = "imported",
        parent: int | None = None,
        data_hash: str | None = None,
        recipe: dict[str, Any] | None = None,
        eval_report: dict[str, Any] | None = None,
        status: str = "candidate",
        promote: bool = False,
        expected_fingerprint: str | None = None,
    ) -> VersionInfo:
        """Validate ``source_dir`` against ``base_dir``, copy it in as the next version of ``name``, return it.

        The copy is what gets validated, so a source still being written cannot slip past the checks.
        ``promote=True`` (or ``status="promoted"``) makes it the served version in the same atomic step.
        """
        validate_name(name)
        source_dir = Path(source_dir)
        _check_choice("stage", stage, STAGES)
        _check_choice("status", status, STATUSES)
        expected_fingerprint = expected_fingerprint or declared_fingerprint(source_dir)
        self._check_before_copying(source_dir, base_dir, expected_fingerprint)
        with self._locked():
            state = self._read_state(name)
            version = max([state.last_version, *self._version_numbers(name)]) + 1
            if parent is not None and not 1 <= parent < version:
                raise VersionNotFound(f"parent version {parent} of adapter {name!r} was never registered")
            tmp = self._tmp_dir()
            try:
                sha256 = {}
                for filename in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                    if not (source_dir / filename).is_file():
                        raise InvalidAdapter(f"{source_dir}: {filename} is missing")
                    sha256[filename] = _copy_file(source_dir / filename, tmp / filename)
                facts = None
                if (source_dir / FACTS_FILE).is_file():
                    facts = {"sha256": _copy_file(source_dir / FACTS_FILE, tmp / FACTS_FILE), **_fact_counts(tmp)}
                summary = validate_adapter(tmp, base_dir, expected_fingerprint=expected_fingerprint)
                manifest = {
                    "format": 1,
                    "name": name,
                    "version": version,
                    "base_id": base_id,
                    "base_fingerprint": summary.base_fingerprint,
                    "stage": stage,
                    "parent": parent,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "data_hash": data_hash,
                    "recipe": recipe or {},
                    "eval_report": eval_report,
                    "status": "candidate" if promote or status == "promoted" else status,
                    "rank": summary.rank,
                    "scale": summary.scale,
                    "dropout": summary.dropout,
                    "num_layers": summary.num_layers,
                    "modules": list(summary.modules),
                    "dtypes": list(summary.dtypes),
                    "num_params": summary.num_params,
                    "size_bytes": summary.size_bytes,
                    "weights_sha256": sha256[ADAPTER_WEIGHTS],
                    "facts": facts,
                }
                _write_file(tmp / MANIFEST, _dumps(manifest))
                _fsync_dir(tmp)
                self._publish(tmp, name, version)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            state.last_version = version
            if promote or status == "promoted":
                self._switch(state, version)
            elif status != "candidate":
                state.status[version] = status
            self._commit(name, state)
        return self.resolve(name, version)

    def promote(self, name: str, version: int) -> VersionInfo:
        """Serve ``version`` for ``name`` from now on; the previously promoted version becomes ``retired``."""
        with self._locked():
            state = self._read_state(validate_name(name))
            self._require(name, version)
            if state.promoted != version:
                self._switch(state, version)
                self._commit(name, state)
        return self.resolve(name, version)

    def rollback(self, name: str, to: int | None = None) -> VersionInfo:
        """Serve an earlier version again: ``to``, by default the version promoted before the current one."""
        with self._locked():
            state = self._read_state(validate_name(name))
            current = state.promoted
            if current is None and to is None:
                self._require(name, None)
                raise AdapterConflict(f"adapter {name!r} has no promoted version to roll back from")
            if to is None:
                earlier = [v for v in state.history if v != current and self._exists(name, v)]
                if not earlier:
                    raise AdapterConflict(f"adapter {name!r} has no earlier promoted version to roll back to")
                to = earlier[-1]
            self._require(name, to)
            if to != current:
                if to in state.history:  # back in time: forget the promotions that came after it
                    state.history = state.history[: state.history.index(to)]
                self._switch(state, to)
                self._commit(name, state)
        return self.resolve(name, to)

    def set_status(
        self, name: str, version: int, status: str, eval_report: dict[str, Any] | None = None
    ) -> VersionInfo:
        """Mark a version (e.g. ``rejected`` by the eval gate), optionally replacing its eval report."""
        _check_choice("status", status, STATUSES)
        with self._locked():
            state = self._read_state(validate_name(name))
            self._require(name, version)
            if status == "promoted":
                self._switch(state, version)
            elif state.promoted == version:
                raise AdapterConflict(
                    f"{name}@{version} is promoted; promote another version or roll back before marking it {status}"
                )
            else:
                state.status[version] = status
            if eval_report is not None:
                state.eval_reports[version] = eval_report
            self._commit(name, state)
        return self.resolve(name, version)

    def remove(self, name: str, version: int | None = None) -> None:
        """Delete one version (never the promoted one) or, with ``version=None``, the whole adapter.

        Version numbers are never reused: ``state.json`` keeps the last number even for a removed adapter.
        """
        with self._locked():
            state = self._read_state(validate_name(name))
            if version is None:
                doomed = self._version_numbers(name)
                if not doomed:
                    raise AdapterNotFound(f"adapter {name!r} not found")
                state = _State(last_version=max([state.last_version, *doomed]))
            else:
                self._require(name, version)
                if state.promoted == version:
                    raise AdapterConflict(
                        f"{name}@{version} is promoted; promote or roll back to another version before removing it"
                    )
                doomed = [version]
                state.forget(version)
            trash = []
            for number in doomed:
                trash.append(self._tmp_dir(create=False))
                os.rename(self.root / name / str(number), trash[-1])
            _fsync_dir(self.root / name)
            self._commit(name, state)
            for path in trash:
                shutil.rmtree(path, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across processes and threads (each call opens its own file description); freed on death."""
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._clean_tmp()
            yield
        finally:
            os.close(fd)

    def recover(self) -> None:
        """Clean what writers that died left in ``.tmp/`` (the daemon calls this at start-up; every writer does it
        too, under the lock)."""
        with self._locked():
            pass

    def _clean_tmp(self) -> None:
        """Whatever is in ``.tmp/`` while we hold the lock was left by a writer that died."""
        tmp_root = self.root / _TMP
        if tmp_root.is_dir():
            for entry in tmp_root.iterdir():
                shutil.rmtree(entry, ignore_errors=True)

    def _tmp_dir(self, *, create: bool = True) -> Path:
        tmp_root = self.root / _TMP
        tmp_root.mkdir(exist_ok=True)
        path = tmp_root / uuid.uuid4().hex
        if create:
            path.mkdir()
        return path

    def _publish(self, tmp: Path, name: str, version: int) -> None:
        adapter_dir = self.root / name
        if not adapter_dir.is_dir():
            adapter_dir.mkdir()
            _fsync_dir(self.root)
        os.rename(tmp, adapter_dir / str(version))
        _fsync_dir(adapter_dir)

    def _switch(self, state: _State, version: int) -> None:
        if state.promoted is not None and state.promoted != version:
            state.status[state.promoted] = "retired"
        state.status[version] = "promoted"
        state.history = [v for v in state.history if v != version] + [version]
        state.promoted = version

    def _commit(self, name: str, state: _State) -> None:
        """Replace the adapter's state, then bump the generation so pollers notice."""
        _write_json_atomic(self.root / name / _STATE, state.to_json())
        _write_json_atomic(self.root / _GENERATION, self.generation() + 1)

    def _read_state(self, name: str) -> _State:
        try:
            return _State.from_json(json.loads((self.root / name / _STATE).read_text()))
        except FileNotFoundError:
            return _State()

    def _version_numbers(self, name: str) -> list[int]:
        try:
            entries = list((self.root / name).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(e.name) for e in entries if e.name.isdigit() and e.name == str(int(e.name)))

    def _exists(self, name: str, version: int) -> bool:
        return (self.root / name / str(version) / MANIFEST).is_file()

    def _require(self, name: str, version: int | None) -> None:
        if version is not None and self._exists(name, version):
            return
        if not self._version_numbers(name):
            raise AdapterNotFound(f"adapter {name!r} not found")
        if version is not None:
            raise VersionNotFound(f"adapter {name!r} has no version {version}")

    def _info(self, name: str, version: int, state: _State) -> VersionInfo | None:
        path = self.root / name / str(version)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None  # never registered, or removed between listing and reading
        return VersionInfo(
            name=name,
            version=version,
            path=path,
            base_id=manifest["base_id"],
            base_fingerprint=manifest["base_fingerprint"],
            stage=manifest["stage"],
            parent=manifest["parent"],
            created=manifest["created"],
            data_hash=manifest["data_hash"],
            recipe=manifest["recipe"],
            eval_report=state.eval_reports.get(version, manifest["eval_report"]),
            status=state.status.get(version, manifest["status"]),
            rank=manifest["rank"],
            scale=manifest["scale"],
            size_bytes=manifest["size_bytes"],
            weights_sha256=manifest["weights_sha256"],
        )


def _fact_counts(version_dir: Path) -> dict[str, int]:
    """A copied fact graph's counts for the manifest; a file that is not one refuses the version."""
    try:
        store = FactStore(version_dir / FACTS_FILE)
    except FactsError as exc:
        raise InvalidAdapter(str(exc)) from exc
    store.close()
    return store.counts


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _copy_file(source: Path, target: Path) -> str:
    """Copy and fsync; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_file(tmp, _dumps(value))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; some filesystems refuse to fsync a directory, which only costs durability."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
