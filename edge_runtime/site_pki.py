"""The site's small PKI: its CA, the broker's and each user's certificate, and the revocation list.

On the generated TLS listener a client is who its certificate says (``use_identity_as_username``), so
these certificates are the site's logins; the CRL is how ``remove-node`` takes one back. Every key is
EC P-256, every certificate signed by the site CA with SHA-256.

``cryptography`` comes with the ``edge`` extra and is imported inside the functions, so importing this
module (and :mod:`edge_runtime.site_security`) does not need it; only making or reading a certificate does.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.errors import AggregatorError
from edge_runtime.site_folder import SiteFolder
from spar_wire.atomic_file import write_atomic

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificateIssuerPrivateKeyTypes,
        CertificatePublicKeyTypes,
    )

CA_DAYS = 3650
LEAF_DAYS = 730


def new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    # Backdated a little: a node whose clock is a few minutes behind must not see a "future" certificate.
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=10), now + dt.timedelta(days=days)


def _name(common_name: str, site: str | None = None) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spar-edge")]
    if site is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site))
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(site: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed site CA (key and certificate), allowed to sign certificates and CRLs only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = new_key()
    name = _name(f"spar-edge {site} CA", site)
    start, end = _validity(CA_DAYS)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(public_key: CertificatePublicKeyTypes, subject: x509.Name, ca_key: CertificateIssuerPrivateKeyTypes,
          ca_cert: x509.Certificate, usage: x509.ObjectIdentifier,
          extra: Iterable[x509.ExtensionType] = ()) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    start, end = _validity(LEAF_DAYS)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False))
    for extension in extra:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def server_cert(key: ec.EllipticCurvePrivateKey, ca_key: CertificateIssuerPrivateKeyTypes, ca_cert: x509.Certificate,
                hostnames: Sequence[str]) -> x509.Certificate:
    """The broker's certificate: CN the first hostname, every hostname / IP in the SAN (what clients check)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    names = [x509.IPAddress(ipaddress.ip_address(h)) if is_ip(h) else x509.DNSName(h) for h in hostnames]
    return _leaf(key.public_key(), _name(hostnames[0]), ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH,
                 [x509.SubjectAlternativeName(names)])


def client_cert(key: ec.EllipticCurvePrivateKey, user: str, ca_key: CertificateIssuerPrivateKeyTypes,
                ca_cert: x509.Certificate) -> x509.Certificate:
    """A client certificate whose CN is ``user``: the MQTT username and client id it logs in as."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    return _leaf(key.public_key(), _name(user), ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH)


def crl_pem(ca_key: CertificateIssuerPrivateKeyTypes, ca_cert: x509.Certificate,
            revoked: Sequence[x509.RevokedCertificate]) -> bytes:
    """The site CRL listing ``revoked`` (``x509.RevokedCertificate``s), signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    # OpenSSL refuses *every* client while the CRL is "not yet valid" or expired, so its validity is
    # the CA's: a broker box whose clock is behind (booted without NTP) or a CRL never refreshed must
    # not lock the whole site out. Issued from the CA's start, valid until the CA expires.
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(ca_cert.not_valid_before_utc).next_update(ca_cert.not_valid_after_utc)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
               .add_extension(x509.CRLNumber(len(revoked)), critical=False))
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def revoke(folder: SiteFolder, ca_key: CertificateIssuerPrivateKeyTypes, ca_cert: x509.Certificate,
           serial: int) -> None:
    """Add one certificate serial to ``broker/crl.pem`` (created when a folder predates it)."""
    from cryptography import x509

    revoked = []
    if folder.crl.exists():
        try:
            crl = x509.load_pem_x509_crl(folder.crl.read_bytes())
        except ValueError as exc:
            raise AggregatorError(f"{folder.crl}: not a CRL: {exc}") from None
        if not crl.is_signature_valid(ca_cert.public_key()):
            raise AggregatorError(f"{folder.crl} is not signed by this site's CA; refusing to extend it")
        revoked = list(crl)
    if any(entry.serial_number == serial for entry in revoked):
        return
    revoked.append(x509.RevokedCertificateBuilder().serial_number(serial)
                   .revocation_date(dt.datetime.now(dt.timezone.utc)).build())
    write_atomic(folder.crl, crl_pem(ca_key, ca_cert, revoked), mode=0o644, keep_owner=True)


def cert_serial(path: Path, user: str) -> int:
    """The serial of ``user``'s certificate at ``path``: what its CRL entry names."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
    except OSError as exc:
        raise AggregatorError(f"cannot revoke {user!r}: its certificate {path} is unreadable ({exc.strerror}); "
                              "put the node's copy of it back there and run again") from None
    except ValueError as exc:
        raise AggregatorError(f"cannot revoke {user!r}: {path} is not a certificate: {exc}") from None


def cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    # Unencrypted PKCS#8: Mosquitto and unattended nodes cannot type a passphrase; 0600 protects it.
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_atomic(path, pem, mode=0o600, keep_owner=True)


def load_ca(folder: SiteFolder) -> tuple[CertificateIssuerPrivateKeyTypes, x509.Certificate]:
    """The site CA's key and certificate, read back to sign a new certificate or the CRL."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(folder.ca_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(folder.ca_cert.read_bytes())
    except OSError as exc:
        raise AggregatorError(f"cannot read the site CA ({exc.filename}): {exc.strerror}; add-node, remove-node "
                              "and upgrade need ca.key in the security folder") from None
    except ValueError as exc:
        raise AggregatorError(f"{folder.root}: the site CA is unreadable: {exc}") from None
    return key, cert


def is_ip(text: str) -> bool:
    """Whether a broker hostname is an IP address: it goes in the SAN as one, not as a DNS name."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
