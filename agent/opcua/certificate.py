"""The OPC UA server's application instance certificate: a self-signed RSA 2048 / SHA-256 certificate.

What OPC UA (Part 6, 6.2.2) asks of it: the subjectAltName holds the server's ApplicationUri
(`urn:genclip-inspect:<line>` unless `[opcua].application_uri` says otherwise) and the host's DNS
name; key usage digitalSignature, nonRepudiation, keyEncipherment, dataEncipherment; extended key
usage serverAuth and clientAuth. Written by `genclip opcua cert` (this module, through asyncua's
certificate helpers) for development and tests; deploy/install.sh writes the same with openssl.

PLCs must trust it: copy `opcua-cert.der` into the PLC's certificate manager (TIA Portal: the
client's trusted partner certificates), or accept it once in the client's certificate dialog.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

CERT_NAME = "opcua-cert.der"
KEY_NAME = "opcua-key.pem"


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    certificate: Path
    private_key: Path


def write_certificate(
    folder: Path,
    application_uri: str,
    *,
    hostname: str | None = None,
    common_name: str = "GenCLIP Inspect",
    days: int = 3650,
    client: bool = False,
    overwrite: bool = False,
) -> CertificateFiles:
    """`opcua-cert.der` and `opcua-key.pem` (mode 0600) in `folder`; FileExistsError unless `overwrite`.

    `client=True` makes a client's certificate instead (clientAuth only), for tests and tools."""
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(folder / CERT_NAME, folder / KEY_NAME)
    if not overwrite and (files.certificate.exists() or files.private_key.exists()):
        raise FileExistsError(f"{files.certificate} or {files.private_key} exists (--force replaces them)")
    host = hostname or socket.gethostname()
    key = generate_private_key()
    uses = (
        [ExtendedKeyUsageOID.CLIENT_AUTH]
        if client
        else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    names = [x509.UniformResourceIdentifier(application_uri), x509.DNSName(host)]
    cert = generate_self_signed_app_certificate(key, common_name, {}, names, extended=uses, days=days)
    fd = os.open(files.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(dump_private_key_as_pem(key))
    files.certificate.write_bytes(cert.public_bytes(Encoding.DER))
    return files


def certificate_der(path: Path) -> bytes:
    """A certificate file's DER bytes (PEM or DER on disk); ValueError naming the file when it is not one."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        data = path.read_bytes()
        pem = data.lstrip().startswith(b"-----")
        cert = x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable X.509 certificate (DER or PEM): {exc}") from None
    return cert.public_bytes(Encoding.DER)


def trusted_certificates(folder: Path) -> frozenset[bytes]:
    """The DER bytes of every file in `folder` (each must be a certificate; ValueError names the first that is not)."""
    return frozenset(certificate_der(path) for path in sorted(folder.iterdir()) if path.is_file())
