"""Atomic writes under faults: a full disk and a read-only file system give one StorageError, the old file
intact and no temp file; temps of crashed writers go at the next write; files follow the umask."""
import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import save_file

from fusegrad.core.errors import StorageError
from fusegrad.core.fileio import atomic_path, atomic_write_bytes, remove_stale_temps


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only: CI runs as root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_clear_error_and_the_old_file_stays(small_disk):
    path = small_disk / "checkpoint.bin"
    atomic_write_bytes(path, b"good")
    with pytest.raises(StorageError, match=r"checkpoint.bin: cannot write \(the disk is full\); the previous file"):
        atomic_write_bytes(path, b"x" * (1 << 20))
    assert path.read_bytes() == b"good" and os.listdir(small_disk) == ["checkpoint.bin"]


def test_full_disk_inside_safetensors_is_a_storage_error_too(small_disk):
    path = small_disk / "model.safetensors"
    with pytest.raises(StorageError, match="the disk is full"):
        with atomic_path(path) as tmp:
            save_file({"w": np.zeros(1 << 16, np.float32)}, tmp)  # raises safetensors' own error
    assert os.listdir(small_disk) == []


def test_read_only_file_system(small_disk):
    atomic_write_bytes(small_disk / "a.bin", b"old")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(StorageError, match=r"a.bin: cannot write \(the file system is read-only\)"):
        atomic_write_bytes(small_disk / "a.bin", b"new")
    assert (small_disk / "a.bin").read_bytes() == b"old"


def test_temps_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    proc = subprocess.Popen(["true"])  # a writer that has exited: its pid is free
    proc.wait()
    stale = tmp_path / f"ckpt.safetensors.{proc.pid}.abc.tmp"
    live = tmp_path / f"ckpt.safetensors.{os.getppid()}.def.tmp"
    other = tmp_path / f"other.bin.{proc.pid}.x.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    atomic_write_bytes(path, b"new")
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_temps(tmp_path / "other.bin") == [str(other)]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umasks_permissions(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f").st_mode & 0o777 == mode


def test_a_directory_loses_the_temps_of_every_dead_writer(tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = [tmp_path / f"checkpoint.safetensors.{proc.pid}.a1.tmp", tmp_path / f"tokenizer.json.{proc.pid}.b_2.tmp"]
    keep = [tmp_path / f"x.bin.{os.getpid()}.c.tmp", tmp_path / "notes.tmp", tmp_path / "checkpoint.safetensors"]
    for p in stale + keep:
        p.write_bytes(b"partial")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(map(str, stale))
    assert all(p.exists() for p in keep)
