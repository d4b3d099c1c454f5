"""io.atomic: atomic files and directories, locks, safe artifact names."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from pruning_core.errors import ArtifactError
from pruning_core.io.atomic import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    directory_lock,
    safe_child,
    sha256_file,
)


class Crash(Exception):
    pass


def test_crash_inside_atomic_path_leaves_no_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(Crash), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise Crash
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_crash_keeps_the_previous_version(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(Crash), atomic_path(target) as tmp:
        tmp.write_text("new but incomplete")
        raise Crash
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_final_file_gets_umask_permissions_not_mkstemp_private(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "x.txt", "hi")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_dir_builds_then_renames(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
        assert not final.exists()
    assert (final / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_crash_leaves_nothing_and_keeps_old(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(Crash), atomic_dir(final) as tmp:
        (tmp / "a").write_text("new")
        raise Crash
    assert (final / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_replaces_existing(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "old_only").write_text("x")
    with atomic_dir(final) as tmp:
        (tmp / "new_only").write_text("y")
    assert sorted(p.name for p in final.iterdir()) == ["new_only"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_sha256_file_known_value_and_missing(tmp_path):
    p = atomic_write_text(tmp_path / "abc", "abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(ArtifactError, match="does not exist"):
        sha256_file(tmp_path / "nope")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "", ".", "a/.."])
def test_safe_child_refuses_escapes_and_the_root_itself(tmp_path, name):
    with pytest.raises(ArtifactError):
        safe_child(tmp_path, name)


def test_safe_child_accepts_nested_names(tmp_path):
    assert (
        safe_child(tmp_path, "scores/a.b.safetensors") == (tmp_path / "scores" / "a.b.safetensors").resolve()
    )


def test_directory_lock_serializes_threads(tmp_path):
    inside = []
    overlaps = []

    def work(i):
        with directory_lock(tmp_path):
            if inside:
                overlaps.append(i)
            inside.append(i)
            time.sleep(0.02)
            inside.remove(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
