"""Atomic writes: whole files with ordinary permissions, leftovers of killed writers cleared, folders replaced whole."""

import os

import pytest

from mechscope.core.files import atomic_dir, atomic_write, clear_leftovers


def test_atomic_write_gives_the_usual_permissions_and_leaves_nothing_behind(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "a" / "f.txt", "hello")
    finally:
        os.umask(old)
    assert p.read_text() == "hello" and (p.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.txt"]


def test_clear_leftovers_removes_only_the_files_temporary_copies(tmp_path):
    target = tmp_path / "shard-1.safetensors"
    (tmp_path / "shard-1.safetensors.abc123.tmp").write_text("torn")
    (tmp_path / "shard-10.safetensors.xyz.tmp").write_text("another shard's")
    (tmp_path / "shard-1.safetensors").write_text("whole")
    assert clear_leftovers(target) == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["shard-1.safetensors", "shard-10.safetensors.xyz.tmp"]


def test_atomic_dir_removes_a_failed_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
