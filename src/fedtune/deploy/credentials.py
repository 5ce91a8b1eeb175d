"""``fedtune deploy credentials``: a federation's TLS certificates and SuperNode keys, made with ``cryptography``.

For laboratories and tests: a self-signed certificate authority, the coordinator's server certificate (valid for
the addresses it is reached at: it serves the SuperLink and fedtune's split stream), and one ECDSA key pair per
SuperNode in OpenSSH format (what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
register`` read). An organisation with its own PKI uses its own files instead; the layout is the same.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedtune.core.files import atomic_write


@dataclass(frozen=True)
class Credentials:
    """Where one federation's files are."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "certificates" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "certificates" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "certificates" / "server.key"

    def node_key(self, index: int) -> Path:
        """SuperNode ``index``'s private key (its public key is beside it, with ``.pub``)."""
        return self.root / "keys" / f"supernode-{index}"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_credentials(out: Path, hosts: list[str], nodes: int, days: int = 365) -> Credentials:
    """Write a CA, a server certificate for ``hosts`` (IP addresses or DNS names) and ``nodes`` SuperNode key
    pairs under ``out``; returns where they are."""
    creds = Credentials(Path(out))
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedtune federation CA")).issuer_name(_name("fedtune federation CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    creds.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(creds.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    atomic_write(creds.server_cert, server.public_bytes(serialization.Encoding.PEM))
    atomic_write(creds.server_key, _pem_key(server_key))
    creds.server_key.chmod(0o600)
    for index in range(nodes):
        write_node_key(creds.node_key(index))
    return creds


def write_node_key(path: Path) -> Path:
    """An ECDSA (NIST P-384) SuperNode key pair in OpenSSH format: ``path`` (private) and ``path.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write(path.with_name(path.name + ".pub"), public + b"\n")
    return path
