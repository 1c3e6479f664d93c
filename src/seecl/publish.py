"""Publishing files and directories so that a reader never sees a half-written one.

Owns the write-to-staging, fsync, atomic-rename pattern every writer in seecl uses: JSON files
(`write_json_atomic`, read back by `read_json_object`) and whole directories (`publish_dir`). A
directory is written under a staging name beside its final place, every file and the directory
itself are fsynced, and it is renamed into place. Replacing an existing directory swaps the two in
one `renameat2(RENAME_EXCHANGE)` on Linux, so the final path always names a complete directory;
elsewhere the old one is first moved aside and put back by `clean_stale` if the writer died between
the two renames. Staging names carry the writer's pid, so `clean_stale` removes only what dead
writers left behind and never another live writer's work. `held` gives one process at a time a
directory (a learner, a benchmark run) and tells the others who holds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import fcntl
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_STAGING = ".staging"
_ASIDE = ".aside"


def now() -> str:
    """The time records are stamped with: UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def make_dir(directory: Path, error: type[Exception] = RuntimeError) -> None:
    """Create `directory` (and its parents) if missing, or raise `error` saying why it cannot be one."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        found = next((p for p in (directory, *directory.parents) if p.exists()), None)
        why = f"{found} is a file" if found is not None and not found.is_dir() else exc.strerror
        raise error(f"{directory}: cannot be used as a directory ({why})") from None


@contextmanager
def held(lock: Path, what: str, error: type[Exception] = RuntimeError) -> Iterator[None]:
    """Hold `lock` (a file, created if missing) for one process doing `what`, or raise `error`
    at once naming the holder (its `what`, pid, host and start). The lock is the kernel's
    (flock), so a holder killed with SIGKILL releases it."""
    make_dir(lock.parent, error)
    # Opened without truncating: the holder's record stays readable to those turned away.
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"{lock.parent} is busy: {_holder(fd)}; wait for it to finish") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return f"{record['what']} (pid {record['pid']} on {record['host']}, since {record['since']})"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "another process holds it"


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_json_object(path: Path, problem: str, error: type[Exception] = RuntimeError) -> dict[str, Any]:
    """A JSON object file, or `error("<path>: <problem> (<why>)")` for a missing or unreadable file,
    bad UTF-8, bad JSON, absurd nesting or anything but an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise error(f"{path}: {problem} ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {problem} (not a JSON object)")
    return data


def publish_dir(final: Path, write: Callable[[Path], None], replace: bool = False) -> bool:
    """Write a directory through `write(staging)` and make it appear at `final` in one step.

    An existing `final` is kept (the first writer wins; returns False) unless `replace`, which
    swaps the new directory in atomically. The staging directory never survives a failure of
    `write`; a writer killed mid-way leaves a staging directory that `clean_stale` removes.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    if final.exists() and not replace:
        return False
    staging = final.with_name(f".{final.name}{_STAGING}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        write(staging)
        _fsync_tree(staging)
        if not final.exists():
            try:
                os.rename(staging, final)  # fails on a non-empty directory another writer just published
            except OSError:
                if not replace:
                    return False
                _swap(staging, final)
        elif replace:
            _swap(staging, final)
        else:
            return False
        _fsync_dir(final.parent)
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the new staging, or the old directory swapped out


def clean_stale(final: Path) -> None:
    """Remove what dead writers of `final` left behind; restore a directory moved aside by a writer
    that died before its replacement was in place."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for child in final.parent.iterdir():
        for marker in (_STAGING, _ASIDE):
            prefix = f".{final.name}{marker}-"
            if not child.name.startswith(prefix):
                continue
            pid = child.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            if marker == _ASIDE and not final.exists():
                os.rename(child, final)
            else:
                shutil.rmtree(child, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap(staging: Path, final: Path) -> None:
    """Exchange `staging` and `final` (afterwards `staging` holds the old directory)."""
    if _rename_exchange(staging, final):
        return
    aside = final.with_name(f".{final.name}{_ASIDE}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(final, aside)
    os.rename(staging, final)
    os.rename(aside, staging)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(a: Path, b: Path) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
