"""The one write-then-rename helper: a failed write leaves the old file and no debris."""

import os
import stat

import pytest

from spar_wire.atomic_file import atomic_writer, write_atomic


def test_replaces_the_file_with_the_new_content_and_mode(tmp_path):
    target = tmp_path / "sub" / "secret.txt"
    write_atomic(target, "old")
    write_atomic(target, "new", mode=0o640)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["secret.txt"]


def test_a_failure_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"complete old model")
    with pytest.raises(RuntimeError, match="disk died"), atomic_writer(target) as handle:
        handle.write(b"half a new mod")
        raise RuntimeError("disk died")
    assert target.read_bytes() == b"complete old model"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_keeps_the_owner_of_the_replaced_file(tmp_path):
    target = tmp_path / "passwords"
    target.write_text("x")
    before = target.stat()
    write_atomic(target, "y", mode=0o600, keep_owner=True)
    after = target.stat()
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert target.read_text() == "y"
