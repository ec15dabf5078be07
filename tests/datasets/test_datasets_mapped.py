"""Reusable read-only maps of stored files: reused only for the same file in the same state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.datasets.mapped import MappedFiles


def read(maps: MappedFiles, path: Path) -> bytes:
    with maps.open(path) as view:
        return bytes(view)


def test_a_map_is_reused_for_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 100)
    maps = MappedFiles()
    with maps.open(path) as first:
        first_address = first.obj  # the mmap object behind the view
    with maps.open(path) as second:
        assert second.obj is first_address
    assert len(maps) == 1 and read(maps, path) == b"abc" * 100
    maps.clear()
    assert len(maps) == 0


def test_a_changed_file_gets_a_new_map(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 5000)
    maps = MappedFiles()
    assert read(maps, path) == b"a" * 5000
    with open(path, "r+b") as fh:  # truncated in place: size and times change
        fh.truncate(100)
    assert read(maps, path) == b"a" * 100
    replacement = tmp_path / "g"
    replacement.write_bytes(b"b" * 300)
    os.replace(replacement, path)  # replaced: another inode
    assert read(maps, path) == b"b" * 300
    maps.clear()


def test_maps_of_deleted_files_are_dropped_at_the_next_open(tmp_path: Path) -> None:
    gone, kept = tmp_path / "gone", tmp_path / "kept"
    gone.write_bytes(b"x" * 10)
    kept.write_bytes(b"y" * 10)
    maps = MappedFiles()
    read(maps, gone)
    gone.unlink()
    read(maps, kept)
    assert len(maps) == 1  # the deleted file's blocks are not kept allocated
    with pytest.raises(FileNotFoundError):
        read(maps, gone)
    maps.clear()


def test_at_most_max_files_and_maps_in_use_stay_valid(tmp_path: Path) -> None:
    maps = MappedFiles(max_files=2)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(bytes([i]) * 100)
    with maps.open(paths[0]) as held:
        read(maps, paths[1])
        read(maps, paths[2])  # the held map is dropped from the list, not closed
        assert len(maps) == 2 and bytes(held) == bytes([0]) * 100
        maps.clear()
        assert bytes(held) == bytes([0]) * 100
    assert len(maps) == 0
