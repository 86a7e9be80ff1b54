"""The site CA and its certificates (edge_runtime.site_pki): what ``init`` issues, that the broker and
its clients trust this CA only, and the revocation list ``remove-node`` extends."""

from __future__ import annotations

import dataclasses
import datetime as dt
import stat

import pytest

from edge_runtime.errors import AggregatorError
from edge_runtime.site_folder import SiteFolder
from edge_runtime.site_passwords import read_password_file
from edge_runtime.site_security import credentials, init_site, remove_node
from tests.edge_runtime.site_security_helpers import SITE_TOML, settings, tls_outcome


def test_init_writes_keys_0600_and_certificates_for_every_user(site):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = SiteFolder(site)
    users = ["aggregator", "aggregator-results", "monitor", *[f"n0{i}" for i in range(1, 9)]]
    assert list(read_password_file(folder.passwd)) == users
    for path in [folder.ca_key, folder.server_key, folder.passwd,
                 *[folder.client_key(u) for u in users], *[folder.password_file(u) for u in users]]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ca = x509.load_pem_x509_certificate(folder.ca_cert.read_bytes())
    node = x509.load_pem_x509_certificate(folder.client_cert("n03").read_bytes())
    server = x509.load_pem_x509_certificate(folder.server_cert.read_bytes())
    # use_identity_as_username: the CN is the username the ACL and the password file know.
    for user in users:
        cert = x509.load_pem_x509_certificate(folder.client_cert(user).read_bytes())
        assert [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)] == [user]
    crl = x509.load_pem_x509_crl(folder.crl.read_bytes())
    assert len(crl) == 0 and crl.is_signature_valid(ca.public_key())
    assert crl.last_update_utc <= ca.not_valid_before_utc + dt.timedelta(seconds=1)
    assert crl.next_update_utc >= ca.not_valid_after_utc - dt.timedelta(seconds=1)
    assert node.issuer == ca.subject and isinstance(node.public_key().curve, ec.SECP256R1)
    assert 700 <= (node.not_valid_after_utc - node.not_valid_before_utc).days <= 731
    assert 3640 <= (ca.not_valid_after_utc - ca.not_valid_before_utc).days <= 3651
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    passwords = {credentials(site, u).password for u in users}
    assert len(passwords) == len(users) and min(map(len, passwords)) >= 40


def test_remove_node_in_a_folder_from_before_revocation(site):
    """An older folder: no crl.pem, and a mosquitto.conf without the CRL. remove-node creates the CRL
    with the node's serial and says what the config lacks."""
    from cryptography import x509

    folder = SiteFolder(site)
    serial = x509.load_pem_x509_certificate(folder.client_cert("n02").read_bytes()).serial_number
    folder.crl.unlink()
    lines = folder.conf.read_text().splitlines()
    folder.conf.write_text("\n".join(line for line in lines if not line.startswith(("crlfile", "use_"))) + "\n")
    done = remove_node(site, "n02")
    assert len(done.notes) == 1 and "use_identity_as_username true" in done.notes[0]
    assert [entry.serial_number for entry in x509.load_pem_x509_crl(folder.crl.read_bytes())] == [serial]
    assert "user n02\ntopic deny #" in folder.acl.read_text()


def test_remove_node_needs_the_certificate_it_revokes(site):
    folder = SiteFolder(site)
    folder.client_cert("n04").unlink()
    with pytest.raises(AggregatorError, match=r"cannot revoke 'n04'.*put the node's copy"):
        remove_node(site, "n04")
    assert "n04" in read_password_file(folder.passwd)  # nothing changed


# --------------------------------------------------------------------------- against Mosquitto
@pytest.mark.mosquitto
def test_tls_needs_the_site_ca_and_a_client_certificate(site, broker, tmp_path):
    other = init_site(SITE_TOML, tmp_path / "other-site").folder
    good = settings(site, broker, "n01")
    assert tls_outcome(good) == "accepted"
    # We do not trust a broker certificate from another CA: the handshake fails on our side.
    assert tls_outcome(dataclasses.replace(good, tls_ca=str(other.ca_cert))) == "tls-error"
    # The broker hangs up on a client without a certificate, or with one from another site's CA.
    assert tls_outcome(dataclasses.replace(good, tls_cert=None, tls_key=None)) in ("closed", "tls-error")
    foreign = dataclasses.replace(good, tls_cert=str(other.client_cert("n01")), tls_key=str(other.client_key("n01")))
    assert tls_outcome(foreign) in ("closed", "tls-error")
    assert tls_outcome(dataclasses.replace(good, tls_ca=None, tls_cert=None, tls_key=None)) in ("closed", "no answer")
    # The broker's own certificate (CN localhost, server use only) is no client identity.
    folder = SiteFolder(site)
    server = dataclasses.replace(good, tls_cert=str(folder.server_cert), tls_key=str(folder.server_key))
    assert tls_outcome(server) in ("closed", "tls-error")
