"""io.atomic: atomic files and directories, locks, safe artifact names."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

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


def test_a_write_past_the_file_size_limit_is_an_artifact_error_naming_the_path(tmp_path):
    """A real size-limited write (RLIMIT_FSIZE in a child process; SIGXFSZ ignored, so write()
    fails with EFBIG): nothing is left under the final name or as a temporary."""
    import subprocess
    import sys

    target = tmp_path / "big.safetensors"
    code = (
        "import resource, signal, sys, torch\n"
        "from pruning_core.errors import ArtifactError\n"
        "from pruning_core.io.tensors import save_tensors\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        "    save_tensors(sys.argv[1], {'w': torch.zeros(10000)}, metadata={'b': '1', 'a': '2'})\n"
        "except ArtifactError as e:\n"
        "    print('ArtifactError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert f"ArtifactError Artifact '{target}': File too large (errno 27)" in out.stdout, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_disk_errors_leave_other_errors_alone(tmp_path):
    from pruning_core.errors import ArtifactError
    from pruning_core.io.atomic import disk_errors

    with pytest.raises(ArtifactError, match="No space left on device"):
        with disk_errors(tmp_path / "x"):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")
    with pytest.raises(ValueError, match="unrelated"):
        with disk_errors(tmp_path / "x"):
            raise ValueError("unrelated")
    with pytest.raises(PermissionError):  # about another file than the one being written
        with disk_errors(tmp_path / "x"):
            raise PermissionError(13, "Permission denied", "/elsewhere/file")
