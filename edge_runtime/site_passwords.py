"""Mosquitto 2 passwords for a site: random passwords, their ``$7$`` hashes and the broker's password file.

Kept apart from certificates and config: it needs neither ``cryptography`` nor the folder layout, and
these few functions are what tests check against ``mosquitto_passwd`` and a real broker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path

from edge_runtime.errors import AggregatorError
from spar_wire.atomic_file import write_atomic

# Passwords are 32 random bytes (256 bits), so key stretching adds no real protection; the broker
# runs PBKDF2 on every CONNECT, so a modest count keeps a reconnect storm of a big site cheap.
PASSWORD_ITERATIONS = 1000
SALT_BYTES = 12  # Mosquitto 2.0.11 never accepts a login against a $7$ entry with another salt length
PASSWORD_BYTES = 32


def new_password() -> str:
    """A fresh random password (URL-safe text, so it fits any config file unquoted)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(password: str, *, iterations: int = PASSWORD_ITERATIONS, salt: bytes | None = None) -> str:
    """Mosquitto 2's ``$7$`` hash (what follows ``user:`` in the password file).

    ``$7$<iterations>$<base64 12-byte salt>$<base64 PBKDF2-HMAC-SHA512, 64 bytes>``, checked against
    ``mosquitto_passwd`` 2.0.11 output and by authenticating against a real broker (tests).
    """
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES or iterations < 1:
        raise AggregatorError(f"a Mosquitto hash needs a {SALT_BYTES}-byte salt and >= 1 iteration")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(hashed: str, password: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (as written by us or by mosquitto_passwd)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, expected = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if not expected:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
    return hmac.compare_digest(digest, expected)


def read_password_file(path: Path) -> dict[str, str]:
    """``{user: hash}`` in file order; hashes are kept verbatim so rewrites leave other users untouched."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AggregatorError(f"cannot read password file {path}: {exc.strerror}") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise AggregatorError(f"{path}:{number}: not a 'user:hash' line")
        entries[user] = hashed
    return entries


def write_password_file(path: Path, entries: dict[str, str]) -> None:
    """Atomically (re)write a Mosquitto password file, so a SIGHUP never reads half of it.

    Always 0600, whatever the old file's mode (one someone made 0640 must not stay group-readable),
    and its owner kept: a file chown'ed to the broker's user stays readable by it.
    """
    write_atomic(path, "".join(f"{user}:{hashed}\n" for user, hashed in entries.items()), mode=0o600,
                 keep_owner=True)
