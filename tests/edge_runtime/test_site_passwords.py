"""Mosquitto passwords (edge_runtime.site_passwords): the ``$7$`` hash against mosquitto_passwd, and
passwords on a listener without client certificates (``plain_broker``), the only place they are checked;
rotation, and secrets that are never readable by more than their owner."""

from __future__ import annotations

import dataclasses
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from edge_runtime.site_folder import SiteFolder
from edge_runtime.site_passwords import hash_password, read_password_file, verify_password
from edge_runtime.site_security import credentials, rotate_password
from tests.edge_runtime.site_security_helpers import NOT_AUTHORIZED, plain, tls_outcome, wait_for


def test_hash_format_matches_mosquitto_passwd(tmp_path):
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        pytest.skip("mosquitto_passwd is not installed")
    subprocess.run([tool, "-c", "-b", str(tmp_path / "pw"), "alice", "s3cret"], check=True, timeout=10)
    theirs = read_password_file(tmp_path / "pw")["alice"]
    ours = hash_password("s3cret")
    assert theirs.split("$")[1] == ours.split("$")[1] == "7"
    assert [len(part) for part in theirs.split("$")[3:]] == [len(part) for part in ours.split("$")[3:]]
    assert verify_password(theirs, "s3cret") and not verify_password(theirs, "s3cret!")
    assert verify_password(ours, "s3cret") and not verify_password(ours, "other")


def test_secrets_get_their_mode_before_their_content(site, monkeypatch):
    """An atomic rewrite of a secret: the temporary file is 0600 when its content is fsync'ed and
    when it replaces the old file (0664 here), never wider in between."""
    import os

    modes: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            assert info.st_size > 0
            modes.append(("fsync", stat.S_IMODE(info.st_mode)))
        return real_fsync(fd)

    def replace(src, dst):
        modes.append(("replace", stat.S_IMODE(os.stat(src).st_mode)))
        return real_replace(src, dst)

    folder = SiteFolder(site)
    folder.passwd.chmod(0o664)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rotate_password(site, "n05")
    assert modes == [("fsync", 0o600), ("replace", 0o600)] * 2, modes


# --------------------------------------------------------------------------- against Mosquitto
@pytest.mark.mosquitto
def test_passwords_gate_a_listener_without_certificates(site, plain_broker, sessions):
    node = plain(site, plain_broker, "n01")
    assert sessions(node).accepted
    for mqtt in (dataclasses.replace(node, username=None, password=None),
                 dataclasses.replace(node, password="wrong"),
                 dataclasses.replace(node, username="n02")):  # n01's password is not n02's
        refused = sessions(mqtt)
        assert refused.connack is not None and refused.connack.value in (0x86, NOT_AUTHORIZED), refused.connack


@pytest.mark.mosquitto
def test_rotate_password_takes_effect_on_sighup(site, plain_broker, sessions):
    folder = SiteFolder(site)
    before = read_password_file(folder.passwd)
    old = plain(site, plain_broker, "n03")
    connected = sessions(old)
    assert connected.accepted
    done = rotate_password(site, "n03")
    after = read_password_file(folder.passwd)
    assert {u: h for u, h in after.items() if u != "n03"} == {u: h for u, h in before.items() if u != "n03"}
    assert credentials(site, "n03").password == done.passwords["n03"] != old.password
    plain_broker.reload()
    new = plain(site, plain_broker, "n03")
    assert wait_for(lambda: tls_outcome(new, 2.0) == "accepted", 5.0), "new password not accepted after SIGHUP"
    assert tls_outcome(old) == "refused"
    assert wait_for(lambda: connected.disconnects > 0), "the session of the old password was not dropped"


@pytest.mark.mosquitto
def test_rotate_password_leaves_no_group_readable_secret(site, plain_broker):
    """Issue 19: a password file (or credential) someone made 0640 stayed 0640 after a rotation.
    Secrets come out 0600 whatever the old mode, owner kept, and the broker still reads them."""
    folder = SiteFolder(site)
    folder.passwd.chmod(0o640)
    folder.password_file("n03").chmod(0o644)
    rotate_password(site, "n03")
    assert stat.S_IMODE(folder.passwd.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.password_file("n03").stat().st_mode) == 0o600
    assert not [p for p in folder.passwd.parent.iterdir() if p.name.startswith(".")], "temporary file left"
    plain_broker.reload()
    assert wait_for(lambda: tls_outcome(plain(site, plain_broker, "n03"), 2.0) == "accepted", 5.0)
