"""Atomic, durable writes: a reader (or a crash, or a power loss) never sees a half-written file or folder, and an
existing one is replaced only once its successor is complete.

The successor is written in a hidden temp folder `.<name>.<hex>.tmp` beside it (a folder's successor is that
folder; a file's lies inside it), every file is fsynced, it is renamed over `<name>`, and the parent folder is fsynced
so the rename itself is on disk. A run killed mid-write leaves its temp folder (or a replaced folder's
`.<name>.<hex>.old`) behind; the next atomic write of the same output removes those, except any that a live writer
holds: each writer keeps an advisory lock (`flock`) on its temp folder, whose inode stays put whatever the writer
does inside it (safetensors replaces the file it is given).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from spectral_diffusion.errors import SpectralDiffusionError


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{suffix}")


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, `root` itself last."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder, name))
        _fsync(Path(folder))


@contextmanager
def _held(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (a file or a folder) for the block: it is in use, not litter."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _fresh(path: Path) -> Iterator[Path]:
    """A new empty temp folder beside `path`, locked for the block. Another writer's cleanup could remove it only in
    the instant between its creation and the lock; one found gone then is made again, so nobody writes into a
    removed temp."""
    while True:
        tmp = _sibling(path, "tmp")
        tmp.mkdir()
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield tmp
    finally:
        os.close(fd)


def remove_stale_siblings(path: str | Path) -> list[Path]:
    """Remove `.<name>.<hex>.tmp` / `.old` siblings of `path` that no live writer holds; returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.(tmp|old)")
    removed = []
    for candidate in sorted(path.parent.iterdir()) if path.parent.is_dir() else ():
        if not pattern.fullmatch(candidate.name):
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or unreadable: not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a running writer holds it
        try:
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
            removed.append(candidate)
        finally:
            os.close(fd)
    return removed


def check_writable(folder: str | Path) -> None:
    """Prove that files can be made in `folder` (or, where it does not exist yet, in the nearest folder above it,
    where it will be made), creating nothing: run before any slow work whose result goes there, so a read-only or
    wrong place is refused in one line, not found after the work."""
    folder = Path(folder).absolute()
    existing = next(above for above in (folder, *folder.parents) if above.exists())
    if not existing.is_dir():
        raise SpectralDiffusionError(f"cannot write to {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise SpectralDiffusionError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a fresh temp path, fsync it, then rename it over `path`.

    The temp file is created empty before `write` runs, with the usual permissions (0666 less the umask), and
    `write` may reopen, truncate or even replace it: writers that make their own private file (safetensors writes
    0600) get the usual permissions back before the rename. It lies in a locked temp folder beside `path`, so a
    writer that replaces it does not drop the lock that keeps other writers' cleanup away.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    with _fresh(path) as folder:
        try:
            tmp = folder / path.name
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
            write(tmp)
            os.chmod(tmp, mode)
            _fsync(tmp)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(folder)
    _fsync(path.parent)
    return path


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success, with every file in it given the usual permissions (0666 less
    the umask, whatever its writer used) and fsynced, it takes `path`'s place (an old folder is removed after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    with _fresh(path) as tmp:
        file_mode = stat.S_IMODE(os.stat(tmp).st_mode) & 0o666  # mkdir applied the umask to 0777
        try:
            yield tmp
            for folder, _, files in os.walk(tmp):
                for name in files:
                    os.chmod(Path(folder, name), file_mode)
            _fsync_tree(tmp)
            if path.exists():
                old = _sibling(path, "old")
                with _held(path):  # the lock follows the folder to `old`: no other writer's cleanup touches it
                    path.rename(old)
                    tmp.rename(path)
                    _fsync(path.parent)
                    shutil.rmtree(old)
            else:
                tmp.rename(path)
                _fsync(path.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
