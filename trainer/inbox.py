"""The watch folder: which files count, when a folder is complete, and what exactly a run trains on.

Layout: ``<state>/inbox/<adapter>/...`` — one folder per adapter, named ``[a-z0-9][a-z0-9._-]{0,63}``; files may sit
in subfolders. Hidden and temporary files (``.*``, ``~$*``, ``*~``, ``*.part``, ``*.tmp``, ``*.crdownload``,
``*.download``, ``Thumbs.db``, ``desktop.ini``) and hidden folders are ignored: they are neither hashed nor trained on.

Nothing here writes to the inbox. A folder is *complete* once the size and mtime of every file in it stayed the same
over a debounce interval (macOS FSEvents sends no close event, so "written and closed" cannot be observed). Its
:class:`InboxSnapshot` records a sha256 per file and one content hash over (relative path, sha256) pairs —
independent of listing order, changed by any edit, addition, removal or rename — so an unchanged inbox never retrains.
A run copies the snapshot's files into its own folder with :func:`copy_snapshot`, which re-hashes the copies, so each
run can be reproduced from ``<runs>/<run-id>/inbox/`` alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from solverx.adapters.names import NAME_PATTERN

log = logging.getLogger(__name__)

ADAPTER_NAME = NAME_PATTERN  # the registry's rule: an inbox folder is named like the adapter it trains
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
IGNORED_PREFIXES = (".", "~$")
IGNORED_SUFFIXES = ("~", ".part", ".tmp", ".crdownload", ".download")
MAX_FILE_BYTES = 64 * 1024 * 1024  # larger files are rejected by validation, so a run does not copy them
_CHUNK = 1 << 20


class InboxChanged(RuntimeError):
    """A file changed while it was being copied into a run; the caller should wait for the folder to settle."""


def is_valid_adapter_name(name: str) -> bool:
    return ADAPTER_NAME.fullmatch(name) is not None


def is_ignored(name: str) -> bool:
    """True for hidden, temporary and OS clutter files that are never part of an inbox."""
    lower = name.lower()
    return lower.startswith(IGNORED_PREFIXES) or lower.endswith(IGNORED_SUFFIXES) or lower in IGNORED_NAMES


def iter_inbox_files(adapter_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, absolute path) of every regular file that counts, sorted. Links (to files or folders)
    and special files are never followed or read: :func:`scan_inbox` lists them too."""
    yield from scan_inbox(adapter_dir)[0]


_REFUSED = {
    "link": "a symbolic link{target}: links are never followed out of the inbox, so its target was not read or "
    "copied; put the file itself here",
    "special": "not a regular file (a FIFO, socket or device): it was not read",
}


def scan_inbox(adapter_dir: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """One walk of an adapter folder: its regular files ``(relative path, path)`` and, apart, what is not a regular
    file ``(relative path, reason)`` — links, FIFOs, sockets, devices — each list sorted."""
    files, refused = [], []
    for rel, path, kind in _walk(adapter_dir):
        if kind == "file":
            files.append((rel, path))
            continue
        target = ""
        if kind == "link":
            with contextlib.suppress(OSError):
                target = f" to {os.readlink(path)}"
        refused.append((rel, _REFUSED[kind].format(target=target)))
    return sorted(files), sorted(refused)


def _walk(adapter_dir: Path) -> Iterator[tuple[str, Path, str]]:
    """(relative path, path, "file" | "link" | "special") of every entry that counts, links never followed."""
    for dirpath, dirnames, filenames in os.walk(adapter_dir):  # followlinks=False: a linked folder is not entered
        linked = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if not is_ignored(d) and d != "__MACOSX" and d not in linked]
        for name in [*filenames, *linked]:
            if is_ignored(name):
                continue
            path = Path(dirpath) / name
            try:
                mode = path.lstat().st_mode
            except OSError:  # removed while we looked
                continue
            kind = "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "special"
            yield path.relative_to(adapter_dir).as_posix(), path, kind


def list_adapters(inbox_root: Path) -> list[str]:
    """Names of the adapter folders in the inbox; folders with invalid names are skipped (and logged)."""
    if not inbox_root.is_dir():
        return []
    names = []
    for entry in sorted(inbox_root.iterdir()):
        if not entry.is_dir() or is_ignored(entry.name):
            continue
        if is_valid_adapter_name(entry.name):
            names.append(entry.name)
        else:
            log.warning("inbox folder %r ignored: adapter names are [a-z0-9][a-z0-9._-]{0,63}", entry.name)
    return names


Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(adapter_dir: Path) -> Fingerprint:
    """(path, size, mtime_ns) of every file: cheap to take, and any write changes it."""
    entries = []
    for rel, path in iter_inbox_files(adapter_dir):
        try:
            st = path.stat()
        except OSError:  # removed between listing and stat: the next look sees the change
            continue
        entries.append((rel, st.st_size, st.st_mtime_ns))
    return tuple(entries)


@dataclass(frozen=True)
class SnapshotFile:
    path: str  # relative to the adapter folder, posix separators
    size: int
    sha256: str


@dataclass(frozen=True)
class InboxSnapshot:
    adapter: str
    files: tuple[SnapshotFile, ...]
    content_hash: str
    refused: tuple[tuple[str, str], ...] = ()  # (path, reason): links and special files, never read

    def to_dict(self) -> dict:
        """Plain data for a run manifest."""
        return {
            "adapter": self.adapter,
            "content_hash": self.content_hash,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(
    files: tuple[SnapshotFile, ...] | list[SnapshotFile], refused: tuple[tuple[str, str], ...] = ()
) -> str:
    """One hash over (path, sha256) pairs, sorted by path so listing order does not matter, and the paths of the
    refused entries (a link dropped in is news too: the run that follows reports it)."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        digest.update(f"{f.path}\0{f.sha256}\n".encode())
    for rel, _ in sorted(refused):
        digest.update(f"{rel}\0refused\n".encode())
    return digest.hexdigest()


def snapshot(adapter_dir: str | Path) -> InboxSnapshot:
    """Hash every file that counts in an adapter folder (read only)."""
    adapter_dir = Path(adapter_dir)
    listed, refused = scan_inbox(adapter_dir)
    files = [SnapshotFile(rel, path.stat().st_size, file_sha256(path)) for rel, path in listed]
    return InboxSnapshot(adapter_dir.name, tuple(files), content_hash(files, tuple(refused)), tuple(refused))


def copy_snapshot(
    snap: InboxSnapshot, adapter_dir: str | Path, dest: str | Path, max_file_bytes: int | None = MAX_FILE_BYTES
) -> list[str]:
    """Copy the snapshot's files into ``dest`` (a run's ``inbox/`` folder) and check each copy against its hash.

    Files larger than ``max_file_bytes`` are not copied (validation rejects them by their snapshot size without
    reading them); their paths are returned. Raises :class:`InboxChanged` if a file no longer matches the snapshot.
    """
    adapter_dir, dest = Path(adapter_dir), Path(dest)
    skipped = []
    for f in snap.files:
        if max_file_bytes is not None and f.size > max_file_bytes:
            skipped.append(f.path)
            continue
        target = dest / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _copy_regular_file(adapter_dir / f.path, target)
        except FileNotFoundError:
            raise InboxChanged(f"{f.path} was removed from the inbox during the copy") from None
        if file_sha256(target) != f.sha256:
            raise InboxChanged(f"{f.path} changed in the inbox during the copy")
    return skipped


def _copy_regular_file(source: Path, target: Path) -> None:
    """Copy ``source`` only if it is still a regular file: a link swapped in after the snapshot is not followed."""
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InboxChanged(f"{source.name} became a link during the copy; links are not followed") from None
        raise
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise InboxChanged(f"{source.name} is no longer a regular file")
        with target.open("wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)


@dataclass
class _Watch:
    fingerprint: Fingerprint | None = None
    since: float = 0.0
    reported: str | None = None


@dataclass
class InboxWatcher:
    """Calls ``on_ready(adapter)`` when an adapter folder has settled and holds content not trained yet.

    A watchdog observer and a periodic rescan both only mark folders as pending; one worker thread then looks at
    each pending folder every ``debounce_s / 4`` until its fingerprint has been unchanged for ``debounce_s``, hashes it,
    and reports it if the hash differs from ``last_hash(adapter)`` (the hash of the last snapshot the caller
    processed, trained or refused) and from the last hash this watcher reported. ``on_ready`` runs on the worker
    thread: hand the work off, do not train there. Exceptions it raises are logged, and the watcher carries on.
    """

    inbox_root: Path
    on_ready: Callable[[str], None]
    last_hash: Callable[[str], str | None] = lambda adapter: None
    debounce_s: float = 2.0
    rescan_s: float = 60.0
    _watches: dict[str, _Watch] = field(default_factory=dict, init=False)
    _pending: set[str] = field(default_factory=set, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _observer: Observer | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.inbox_root = Path(self.inbox_root)

    def start(self) -> InboxWatcher:
        Path(self.inbox_root).mkdir(parents=True, exist_ok=True)
        self.inbox_root = Path(self.inbox_root).resolve()  # event paths arrive resolved (macOS: /private/var/...)
        self._stopping.clear()
        self._observer = Observer()
        self._observer.schedule(_Handler(self), str(self.inbox_root), recursive=True)
        self._observer.daemon = True
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="inbox-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> InboxWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def mark(self, adapter: str) -> None:
        """Have the folder looked at soon (called for watchdog events; callable by anyone, e.g. an admin route)."""
        with self._lock:
            self._pending.add(adapter)
        self._wake.set()

    def scan(self) -> None:
        """Mark every adapter folder; the periodic rescan, so no change is missed if an event was."""
        for adapter in list_adapters(self.inbox_root):
            self.mark(adapter)

    def _run(self) -> None:
        next_rescan = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_rescan:
                self.scan()
                next_rescan = now + self.rescan_s
            with self._lock:
                pending = sorted(self._pending)
            for adapter in pending:
                if self._stopping.is_set():
                    return
                try:
                    settled = self._check(adapter, time.monotonic())
                except Exception:
                    log.exception("inbox check of %r failed", adapter)
                    settled = True
                if settled:
                    with self._lock:
                        self._pending.discard(adapter)
            with self._lock:
                busy = bool(self._pending)
            timeout = self.debounce_s / 4 if busy else max(0.0, next_rescan - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()

    def _check(self, adapter: str, now: float) -> bool:
        """Look at one folder; True once it is settled (reported or nothing new), False while it is still changing."""
        folder = self.inbox_root / adapter
        watch = self._watches.setdefault(adapter, _Watch())
        current = fingerprint(folder) if folder.is_dir() else ()
        if current != watch.fingerprint:
            watch.fingerprint, watch.since = current, now
            return False
        if now - watch.since < self.debounce_s:
            return False
        if not current:
            return True
        try:
            snap = snapshot(folder)
        except OSError:  # a file went away while it was read: look again after the debounce
            watch.fingerprint = None
            return False
        if fingerprint(folder) != current:  # written to while hashing: start the debounce again
            watch.fingerprint = None
            return False
        if snap.content_hash in (watch.reported, self.last_hash(adapter)):
            return True
        watch.reported = snap.content_hash
        log.info("inbox %r is ready (content %s)", adapter, snap.content_hash[:12])
        try:
            self.on_ready(adapter)
        except Exception:
            log.exception("on_ready(%r) failed", adapter)
        return True


class _Handler(FileSystemEventHandler):
    """Maps any file-system event under the inbox to the adapter folder it touches."""

    def __init__(self, watcher: InboxWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = Path(os.fsdecode(raw))
            try:
                rel = path.relative_to(self._watcher.inbox_root)
            except ValueError:
                continue
            if rel.parts and is_valid_adapter_name(rel.parts[0]):
                self._watcher.mark(rel.parts[0])
