"""Atomic writes are durable (fsync of the file, every file of a folder, and the parent) and clean up after a
killed run: its stale temp siblings of the same output are removed by the next write, nobody else's."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from spectral_diffusion import atomic
from spectral_diffusion.atomic import atomic_directory, atomic_write


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths fsynced, in order (read back from /proc, so any way of calling fsync is seen)."""
    paths: list[Path] = []
    real = os.fsync

    def record(fd: int) -> None:
        paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    return paths


def test_a_file_is_fsynced_before_its_rename_and_the_folder_after(tmp_path: Path, synced: list[Path]) -> None:
    out = tmp_path / "out.safetensors"
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"data")

    atomic_write(out, write)
    assert out.read_bytes() == b"data" and synced == [seen[0], tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_every_file_of_a_folder_is_fsynced_before_its_rename(tmp_path: Path, synced: list[Path]) -> None:
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights.safetensors").write_bytes(b"w")
        (tmp / "model_index.json").write_text("{}")
    assert set(synced[:-1]) == {tmp / "unet" / "weights.safetensors", tmp / "unet", tmp / "model_index.json", tmp}
    assert synced[-1] == tmp_path and (out / "unet" / "weights.safetensors").read_bytes() == b"w"
    synced.clear()
    with atomic_directory(out) as tmp:  # replacing a folder
        (tmp / "model_index.json").write_text("[]")
    assert synced == [tmp / "model_index.json", tmp, tmp_path]
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "model_index.json").read_text() == "[]"


@pytest.mark.parametrize("make", ["file", "folder"])
def test_stale_temp_siblings_of_the_same_output_are_removed_by_the_next_write(tmp_path: Path, make: str) -> None:
    out = tmp_path / "fused"
    stale = [tmp_path / ".fused.0123456789ab.tmp", tmp_path / ".fused.abcdef012345.old"]
    stale[0].mkdir()
    (stale[0] / "unet.safetensors").write_bytes(b"half-written")
    stale[1].write_bytes(b"old")
    kept = [tmp_path / ".fused2.0123456789ab.tmp", tmp_path / ".fused.0123456789ab.tmp.keep",
            tmp_path / ".fused.xyz.tmp", tmp_path / "fused.0123456789ab.tmp", tmp_path / ".other.0123456789ab.old"]
    for path in kept:
        path.write_bytes(b"not ours")
    held = tmp_path / ".fused.fedcba987654.tmp"  # a live writer's: locked
    held.mkdir()
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        if make == "file":
            atomic_write(out, lambda tmp: tmp.write_bytes(b"new"))
        else:
            with atomic_directory(out) as tmp:
                (tmp / "x").write_bytes(b"new")
    finally:
        os.close(fd)
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"not ours" for p in kept) and held.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, held.name, *(p.name for p in kept)])


@pytest.mark.parametrize("make", ["file", "folder"])
def test_a_temp_removed_before_its_writer_locked_it_is_made_again(tmp_path: Path, make: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes writing the same output: the other's cleanup may remove this writer's temp in the instant
    between its creation and its lock; the writer notices and writes into a new one."""
    out = tmp_path / "svd.safetensors"
    real, removed = fcntl.flock, []

    def cleanup_wins_once(fd: int, operation: int) -> None:
        temp = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not removed and operation == fcntl.LOCK_EX:  # the writer's lock, not the cleanup's own try
            removed.append(temp)
            assert atomic.remove_stale_siblings(out) == [temp]  # unlocked yet: it looks stale
        real(fd, operation)

    monkeypatch.setattr(atomic.fcntl, "flock", cleanup_wins_once)
    if make == "file":
        atomic_write(out, lambda tmp: tmp.write_bytes(b"new"))
        assert out.read_bytes() == b"new"
    else:
        with atomic_directory(out) as tmp:
            (tmp / "x").write_bytes(b"new")
        assert (out / "x").read_bytes() == b"new"
    assert removed and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_writer_that_replaces_its_temp_file_keeps_it_from_another_writers_cleanup(tmp_path: Path) -> None:
    """safetensors replaces the file it is given: the lock must not be on that file, or a second process writing the
    same output (two jobs computing one SVD cache entry) removes it mid-write."""
    out = tmp_path / "svd.safetensors"

    def write(tmp: Path) -> None:
        tmp.unlink()
        tmp.write_bytes(b"new")  # a new inode, as safetensors' save_file makes
        assert atomic.remove_stale_siblings(out) == []  # the other writer's cleanup, meanwhile

    atomic_write(out, write)
    assert out.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == [out.name]
