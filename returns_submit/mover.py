"""Moving processed photos (archive) and rejected ones (quarantine) out of the inbox,
without ever overwriting a file and without following symlinks.

A move happens only after the photo's record is durable. The record names the
destination planned before it was written, so a run killed between the two finishes
the move on resume (`complete_move`). The source is reached from the inbox folder by
`inbox.parent_dir` (no symlink followed on the way), so only inbox entries ever move.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath

from returns_submit.inbox import file_sha256, parent_dir

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_component(name: str) -> str:
    """A label as one folder name ("T-shirt/top" -> "T-shirt_top"); never "." or ".."."""
    cleaned = _UNSAFE.sub("_", name).strip(" .") or "_"
    return cleaned[:100]


def plan(root: Path, rel_under_root: str, taken: set[str]) -> str:
    """A destination under `root` that exists neither on disk nor in `taken`: the wanted
    name, else `name~1.ext`, `name~2.ext`, ... Returns it relative to `root`, POSIX."""
    wanted = PurePosixPath(rel_under_root)
    candidate, n = wanted, 0
    while str(candidate) in taken or os.path.lexists(root / candidate):
        n += 1
        candidate = wanted.with_name(f"{wanted.stem}~{n}{wanted.suffix}")
    taken.add(str(candidate))
    return str(candidate)


def move(root: Path, rel: str, dst: Path) -> bool:
    """Move the inbox entry `rel` (a file, or a symlink itself) to `dst`, never replacing an
    existing `dst`. Returns False (and logs why) when it cannot; the record is written anyway."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with parent_dir(root, rel) as (fd, name):
            try:
                os.link(name, dst, src_dir_fd=fd, follow_symlinks=False)  # atomic; fails if dst exists
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                    raise
                _copy_then_link(fd, name, dst)
            try:
                os.unlink(name, dir_fd=fd)
            except OSError as e:  # e.g. a read-only inbox (--after keep): the copy stays, so does the photo
                log.warning("copied %s to %s but cannot remove it from the inbox: %s", rel, dst, e)
                return False
        return True
    except OSError as e:
        log.warning("cannot move %s to %s: %s", rel, dst, e)
        return False


def _copy_then_link(dir_fd: int, name: str, dst: Path) -> None:
    """Across file systems: copy to a temporary name beside `dst`, then link it into place."""
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=dir_fd), tmp)
        elif stat.S_ISREG(st.st_mode):
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
            with os.fdopen(src, "rb") as fin, open(tmp, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
        else:
            raise OSError(errno.EINVAL, "not a regular file or symlink; left in place")
        os.link(tmp, dst, follow_symlinks=False)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def complete_move(root: Path, rel: str, dst: Path, sha256: str | None) -> bool:
    """Finish a move interrupted by a kill: `rel` still in the inbox for a written record.
    A file there whose content differs from the record is a new upload and stays."""
    try:
        with parent_dir(root, rel) as (fd, name):
            src = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return True  # gone: the move was done
    if sha256 is not None and file_sha256(root, rel) != sha256:
        return False
    if os.path.lexists(dst):
        there = os.lstat(dst)
        same = (src.st_dev, src.st_ino) == (there.st_dev, there.st_ino)
        if same or (sha256 is not None and _sha256_of(dst) == sha256):
            try:  # linked or copied before the kill; only the unlink was missing
                with parent_dir(root, rel) as (fd, name):
                    os.unlink(name, dir_fd=fd)
            except OSError:
                return False
            return True
        return False
    return move(root, rel, dst)


def _sha256_of(path: Path) -> str | None:
    return file_sha256(path.parent, path.name)
