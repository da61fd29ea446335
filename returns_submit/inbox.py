"""Walking the inbox: a deterministic, streaming listing of the photos of one shard.

Symlinks are never followed, neither to files nor to folders, so nothing outside the
inbox is ever read or moved. Every access goes from the inbox's own folder down one
component at a time with `O_NOFOLLOW` (openat), so a folder swapped for a symlink during
the run is refused too, not followed. A symlink with an image name is rejected (code
`symlink`); any other symlink is skipped and counted. Names starting with a dot
(uploaders' temporary files) and the output folders, when inside the inbox, are skipped.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from returns_model.names import IMAGE_SUFFIXES

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # NONBLOCK: a FIFO never hangs the run


@dataclass(frozen=True)
class Entry:
    """One candidate photo: `rel` is its POSIX path relative to the inbox `root`."""

    root: Path
    rel: str
    is_symlink: bool = False

    @property
    def path(self) -> Path:
        return self.root / self.rel


@dataclass(frozen=True)
class Photo:
    rel: str
    data: bytes
    sha256: str


@dataclass(frozen=True)
class Unreadable:
    """A candidate rejected before sending; `code` is one of the submitter's reasons."""

    rel: str
    code: str  # empty, unreadable, too_large, symlink, not_a_file, vanished
    message: str
    size: int | None = None
    sha256: str | None = None


def shard_of(rel: str, shard_count: int) -> int:
    """Stable shard of a relative path: disjoint, covering, independent of listing order."""
    digest = hashlib.sha1(rel.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % shard_count


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


# ---- no-follow access below the inbox ------------------------------------------------------

@contextmanager
def parent_dir(root: Path, rel: str) -> Iterator[tuple[int, str]]:
    """(fd of the folder holding `rel`, its last name), reached from `root` without following
    any symlink. Raises OSError (ELOOP/ENOTDIR when a folder on the way is a symlink)."""
    *folders, name = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            sub = os.open(folder, _DIR, dir_fd=fd)
            os.close(fd)
            fd = sub
        yield fd, name
    finally:
        os.close(fd)


def lexists(root: Path, rel: str) -> bool:
    try:
        with parent_dir(root, rel) as (fd, name):
            os.stat(name, dir_fd=fd, follow_symlinks=False)
            return True
    except OSError:
        return False


def open_file(root: Path, rel: str) -> int:
    """A read-only fd of the file `rel` (never a symlink, never through one)."""
    with parent_dir(root, rel) as (fd, name):
        return os.open(name, _FILE, dir_fd=fd)


def file_sha256(root: Path, rel: str) -> str | None:
    """SHA-256 of a regular file below `root`, or None if it cannot be read."""
    try:
        fd = open_file(root, rel)
    except OSError:
        return None
    h = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return h.hexdigest()


# ---- the walk ----------------------------------------------------------------------------

def walk(inbox: Path, skipped: Counter, exclude: tuple[Path, ...] = ()) -> Iterator[Entry]:
    """Yield candidate photos under `inbox`, sorted by name at each level.

    Only one folder's names per level are held at a time. `skipped` counts what is left
    out: non_image, hidden, symlink (not an image name), unlistable (a folder that cannot
    be read).
    """
    excluded = {(st.st_dev, st.st_ino) for st in (_stat(p) for p in exclude) if st is not None}
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield from _walk(fd, inbox, "", skipped, excluded)
    finally:
        os.close(fd)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _walk(fd: int, root: Path, prefix: str, skipped: Counter, excluded: set) -> Iterator[Entry]:
    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        skipped["unlistable"] += 1
        return
    for entry in entries:
        rel = prefix + entry.name
        try:
            if entry.name.startswith("."):
                skipped["hidden"] += 1
            elif entry.is_symlink():
                if is_image_name(entry.name):
                    yield Entry(root, rel, is_symlink=True)
                else:
                    skipped["symlink"] += 1
            elif entry.is_dir(follow_symlinks=False):
                try:
                    sub = os.open(entry.name, _DIR, dir_fd=fd)
                except FileNotFoundError:  # vanished since the listing
                    continue
                except OSError:
                    skipped["unlistable"] += 1
                    continue
                try:
                    st = os.fstat(sub)
                    if (st.st_dev, st.st_ino) not in excluded:
                        yield from _walk(sub, root, rel + "/", skipped, excluded)
                finally:
                    os.close(sub)
            elif is_image_name(entry.name):
                yield Entry(root, rel)
            else:
                skipped["non_image"] += 1
        except FileNotFoundError:  # vanished between listing and looking
            continue


def read(entry: Entry, max_bytes: int) -> Photo | Unreadable:
    """Read one candidate without following symlinks; a problem becomes an Unreadable."""
    rel = entry.rel
    if entry.is_symlink:
        return Unreadable(rel, "symlink", "symbolic links are not followed")
    try:
        fd = open_file(entry.root, rel)
    except FileNotFoundError:
        return Unreadable(rel, "vanished", "the file disappeared before it was read")
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return Unreadable(rel, "symlink", "a symbolic link on its path (not followed)")
        return Unreadable(rel, "unreadable", f"cannot open: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Unreadable(rel, "not_a_file", "not a regular file")
        if st.st_size > max_bytes:
            return Unreadable(rel, "too_large", f"{st.st_size} bytes, the limit is {max_bytes}", size=st.st_size)
        with os.fdopen(fd, "rb", closefd=False) as f:
            # Ask for the size fstat gave (+1 to notice growth), not for max_bytes + 1: a buffered
            # read of n allocates n bytes first, and mapping 32 MiB for a 400-byte photo tripled the
            # cost of a read. A file that grew since the fstat is read on, up to the limit.
            data = f.read(min(st.st_size, max_bytes) + 1)
            if len(data) > st.st_size:
                data += f.read(max_bytes + 1 - len(data))
    except OSError as e:
        return Unreadable(rel, "unreadable", f"cannot read: {e.strerror}")
    finally:
        os.close(fd)
    if not data:  # zero bytes (or truncated since the fstat)
        return Unreadable(rel, "empty", "zero-byte file", size=0)
    if len(data) > max_bytes:
        return Unreadable(rel, "too_large", f"more than {max_bytes} bytes", size=len(data))
    return Photo(rel, data, hashlib.sha256(data).hexdigest())
