"""The mesh's local certificate authority: one certificate per service, one for the edge.

`televote up` creates the CA once in the state directory (`pki/`, readable by the operator
running the stack only) and issues each service a key and a certificate naming it in the
subjectAltName (`vote-svc`, `edge`, ...; DNS names cannot hold `_`), into that service's own
directory. Services present their certificate to each other and require one from every
caller; a service's identity in the mesh is the name in its certificate (runtime/mesh.py).
An `operator` certificate lets operators reach health and reflection with grpcurl.

Rotation: certificates live 30 days and are issued again by `televote up` once less than 10
days are left (restart to rotate sooner: delete `services/*/tls` and `pki/operator`); the CA
lives ten years and is rotated by deleting `pki/` and starting the stack again (every
certificate is then issued again from the new CA).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime.mesh import peer_name
from runtime.secrets import private_dir, write_private

CERTIFICATE_DAYS = 30
RENEW_WHEN_DAYS_LEFT = 10
CA_DAYS = 3650
EDGE = "edge"
OPERATOR = "operator"


@dataclass(frozen=True)
class Identity:
    """Where one holder's certificate, key and the CA certificate are."""

    directory: Path

    @property
    def certificate(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca(state_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    pki = private_dir(state_dir / "pki")
    if not (pki / "ca.pem").exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "televote local mesh CA")])
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
        write_private(pki / "ca-key.pem", _pem_key(key))
        write_private(pki / "ca.pem", certificate.public_bytes(serialization.Encoding.PEM))
    certificate = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    loaded = serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    return certificate, loaded


def _fresh(identity: Identity, ca_pem: bytes) -> bool:
    if not (identity.certificate.exists() and identity.key.exists() and identity.ca.exists()):
        return False
    if identity.ca.read_bytes() != ca_pem:
        return False
    certificate = x509.load_pem_x509_certificate(identity.certificate.read_bytes())
    return certificate.not_valid_after_utc - _now() > datetime.timedelta(
        days=RENEW_WHEN_DAYS_LEFT)


def issue(state_dir: Path, holder: str, directory: Path) -> Identity:
    """A key and certificate for `holder` (a service like "vote_svc", "edge" or "operator")
    in `directory`, issued again when missing, near expiry or from another CA."""
    ca_certificate, ca_key = _ca(state_dir)
    ca_pem = ca_certificate.public_bytes(serialization.Encoding.PEM)
    identity = Identity(private_dir(directory))
    if _fresh(identity, ca_pem):
        return identity
    name = peer_name(holder)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256()))
    # Replaced, not rewritten in place: a replica starting now reads the old pair or the new.
    for path, content in ((identity.key, _pem_key(key)),
                          (identity.certificate,
                           certificate.public_bytes(serialization.Encoding.PEM)),
                          (identity.ca, ca_pem)):
        partial = path.with_name(f"{path.name}.new")
        partial.unlink(missing_ok=True)
        write_private(partial, content)
        partial.replace(path)
    return identity
