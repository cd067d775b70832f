"""The watch folder: what counts, snapshot hashes, copies for a run, and the debounced watcher."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from solverx.trainer.inbox import (
    InboxChanged,
    InboxWatcher,
    copy_snapshot,
    is_valid_adapter_name,
    list_adapters,
    snapshot,
)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


@pytest.fixture()
def inbox(tmp_path: Path) -> Path:
    root = tmp_path / "inbox"
    write(root / "solverx" / "facts.md", "SolverX is headquartered in Seocho-dong, Seoul.\n")
    write(root / "solverx" / "qa.jsonl", '{"question": "Where is SolverX?", "answer": "Seoul."}\n')
    write(root / "solverx" / "more" / "notes.txt", "SolverX Fusion is the core product.\n")
    return root


def test_adapter_names() -> None:
    assert is_valid_adapter_name("solverx")
    assert is_valid_adapter_name("a.b_c-9")
    for bad in ("", "Solverx", "-x", ".x", "a/b", "..", "a" * 65, "한국어"):
        assert not is_valid_adapter_name(bad), bad


def test_list_adapters_skips_files_hidden_and_invalid_names(inbox: Path) -> None:
    write(inbox / "stray.txt", "at the top")
    (inbox / "Bad Name").mkdir()
    (inbox / ".hidden").mkdir()
    (inbox / "other").mkdir()
    assert list_adapters(inbox) == ["other", "solverx"]


def test_snapshot_hash_is_stable_and_tracks_every_change(inbox: Path) -> None:
    folder = inbox / "solverx"
    first = snapshot(folder)
    assert first.adapter == "solverx"
    assert [f.path for f in first.files] == ["facts.md", "more/notes.txt", "qa.jsonl"]
    assert snapshot(folder) == first

    # Hidden, temporary and OS clutter files never count.
    for name in (".DS_Store", "~$draft.md", "big.bin.part", "x.tmp", "dl.crdownload", "Thumbs.db", "a.txt~"):
        write(folder / name, "junk")
    write(folder / ".git" / "config", "junk")
    assert snapshot(folder).content_hash == first.content_hash

    write(folder / "facts.md", "SolverX is headquartered in Seocho-dong, Seoul!\n")
    edited = snapshot(folder).content_hash
    assert edited != first.content_hash

    write(folder / "new.txt", "More knowledge.")
    added = snapshot(folder).content_hash
    assert added not in (first.content_hash, edited)

    (folder / "new.txt").rename(folder / "renamed.txt")
    renamed = snapshot(folder).content_hash
    assert renamed not in (first.content_hash, edited, added)

    (folder / "renamed.txt").unlink()
    assert snapshot(folder).content_hash == edited


def test_snapshot_hash_does_not_depend_on_creation_order(tmp_path: Path) -> None:
    files = {"b.txt": "bee", "a.txt": "ay", "sub/c.md": "sea"}
    for name, content in files.items():
        write(tmp_path / "one" / name, content)
    for name, content in reversed(files.items()):
        write(tmp_path / "two" / name, content)
    assert snapshot(tmp_path / "one").content_hash == snapshot(tmp_path / "two").content_hash
    # Same bytes under another path is other content.
    write(tmp_path / "three" / "b.txt", "ay")
    write(tmp_path / "three" / "a.txt", "bee")
    write(tmp_path / "three" / "sub" / "c.md", "sea")
    assert snapshot(tmp_path / "three").content_hash != snapshot(tmp_path / "one").content_hash


def test_copy_snapshot_reproduces_the_inbox_and_leaves_it_alone(inbox: Path, tmp_path: Path) -> None:
    folder = inbox / "solverx"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    snap = snapshot(folder)
    write(folder / "huge.txt", "x" * 2000)
    snap = snapshot(folder)
    dest = tmp_path / "runs" / "r1" / "inbox"
    skipped = copy_snapshot(snap, folder, dest, max_file_bytes=1000)
    assert skipped == ["huge.txt"]
    assert snapshot(dest).content_hash != snap.content_hash  # the oversized file is not there
    assert {f.path: f.sha256 for f in snapshot(dest).files} == {
        f.path: f.sha256 for f in snap.files if f.path != "huge.txt"
    }
    for path, (data, mtime) in before.items():
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime


def test_copy_snapshot_notices_a_file_changed_after_hashing(inbox: Path, tmp_path: Path) -> None:
    folder = inbox / "solverx"
    snap = snapshot(folder)
    write(folder / "facts.md", "changed meanwhile")
    with pytest.raises(InboxChanged, match=r"facts\.md"):
        copy_snapshot(snap, folder, tmp_path / "copy")


def test_links_and_special_files_are_never_followed_read_or_copied_but_quarantined(inbox: Path, tmp_path: Path) -> None:
    import os

    from solverx.trainer.validate import ingest

    folder = inbox / "solverx"
    secret = write(tmp_path / "outside" / "passwd.txt", "root:x:0:0:SECRET-OUTSIDE-THE-INBOX\n")
    (folder / "passwd.txt").symlink_to(secret)  # ln -s /etc/passwd <inbox>/passwd.txt
    (folder / "linked").symlink_to(secret.parent, target_is_directory=True)
    (folder / "dangling.md").symlink_to(tmp_path / "missing.md")
    os.mkfifo(folder / "pipe.txt")
    listing_before = sorted((p.name, p.is_symlink()) for p in folder.rglob("*"))

    snap = snapshot(folder)
    assert {f.path for f in snap.files} == {"facts.md", "qa.jsonl", "more/notes.txt"}
    assert [path for path, _ in snap.refused] == ["dangling.md", "linked", "passwd.txt", "pipe.txt"]
    dest = tmp_path / "run" / "inbox"
    copy_snapshot(snap, folder, dest)
    copied = [p for p in dest.rglob("*") if p.is_file()]
    assert all("SECRET" not in p.read_text() for p in copied) and not any(p.is_symlink() for p in dest.rglob("*"))

    result = ingest(snap, dest, tmp_path / "quarantine")
    reasons = {q.path: q.reason for q in result.quarantined}
    assert set(reasons) == {"dangling.md", "linked", "passwd.txt", "pipe.txt"}
    assert "symbolic link to " + str(secret) in reasons["passwd.txt"] and "not read or copied" in reasons["passwd.txt"]
    assert "not a regular file" in reasons["pipe.txt"]
    assert all(q.copy is None for q in result.quarantined)
    assert {a.path for a in result.accepted} == {"facts.md", "qa.jsonl", "more/notes.txt"}
    quarantined = [p for p in (tmp_path / "quarantine").rglob("*") if p.is_file()]
    assert all(p.suffix == ".reason" and "SECRET" not in p.read_text() for p in quarantined)
    assert sorted((p.name, p.is_symlink()) for p in folder.rglob("*")) == listing_before  # the inbox is untouched


def test_a_link_added_to_the_inbox_changes_its_hash_so_the_next_run_reports_it(inbox: Path, tmp_path: Path) -> None:
    folder = inbox / "solverx"
    before = snapshot(folder).content_hash
    (folder / "passwd.txt").symlink_to(write(tmp_path / "x.txt", "x"))
    assert snapshot(folder).content_hash != before


def test_a_file_swapped_for_a_link_after_the_snapshot_is_not_copied(inbox: Path, tmp_path: Path) -> None:
    folder = inbox / "solverx"
    snap = snapshot(folder)
    secret = write(tmp_path / "secret.md", "SolverX is headquartered in Seocho-dong, Seoul.\n")  # same bytes
    (folder / "facts.md").unlink()
    (folder / "facts.md").symlink_to(secret)
    with pytest.raises(InboxChanged, match="link"):
        copy_snapshot(snap, folder, tmp_path / "copy")


class Recorder:
    """on_ready that records the folder's hash at the moment it is reported."""

    def __init__(self, inbox: Path) -> None:
        self.inbox = inbox
        self.calls: list[tuple[str, str, float]] = []
        self.event = threading.Event()

    def __call__(self, adapter: str) -> None:
        self.calls.append((adapter, snapshot(self.inbox / adapter).content_hash, time.monotonic()))
        self.event.set()

    def wait(self, timeout: float) -> bool:
        ok = self.event.wait(timeout)
        self.event.clear()
        return ok


def test_watcher_waits_until_a_file_being_written_is_stable(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    folder = inbox / "solverx"
    folder.mkdir(parents=True)
    recorder = Recorder(inbox)
    target = folder / "knowledge.txt"
    with InboxWatcher(inbox, recorder, debounce_s=0.4, rescan_s=30):

        def slow_writer() -> None:  # a download or copy in progress: appended to for about a second
            with target.open("a", encoding="utf-8") as fh:
                for i in range(20):
                    fh.write(f"SolverX fact number {i}.\n")
                    fh.flush()
                    time.sleep(0.05)

        writer = threading.Thread(target=slow_writer)
        writer.start()
        writer.join()
        done_at = time.monotonic()
        assert recorder.wait(5), "the folder was never reported"
        assert len(recorder.calls) == 1
        adapter, reported_hash, reported_at = recorder.calls[0]
        assert adapter == "solverx"
        assert reported_at >= done_at
        assert reported_hash == snapshot(folder).content_hash  # the complete file, not a partial one

        # Nothing new: no second report. A change: reported again.
        time.sleep(0.8)
        assert len(recorder.calls) == 1
        write(folder / "more.md", "SolverX Fusion is the core product.")
        assert recorder.wait(5)
        assert len(recorder.calls) == 2


def test_watcher_skips_content_already_trained_and_finds_new_folders_by_rescan(inbox: Path) -> None:
    trained = {"solverx": snapshot(inbox / "solverx").content_hash}
    recorder = Recorder(inbox)
    watcher = InboxWatcher(inbox, recorder, last_hash=trained.get, debounce_s=0.2, rescan_s=0.3)
    with watcher:
        write(inbox / "second" / "a.txt", "Other knowledge.")
        assert recorder.wait(5)
        time.sleep(0.6)  # a full rescan later, still only the new folder
    assert [c[0] for c in recorder.calls] == ["second"]
