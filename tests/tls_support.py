"""A test PKI made with the openssl CLI, and brokers that demand TLS, passwords or ACL users.

Everything is created by the tests in their temporary folders: a CA, a server certificate for
127.0.0.1 and localhost (subjectAltName), a client certificate, and a second CA that signed
nothing of ours (the "wrong CA"). Nothing here is shipped or used outside tests.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.brokers import BrokerStartError, MosquittoServer, RedisServer

MQTT_USER, MQTT_PASSWORD = "agent-line", "mqtt-S3cret-7f1c9a"
REDIS_USER, REDIS_PASSWORD = "genclip-agent", "redis-S3cret-0b8e2d"
REDIS_DEFAULT_PASSWORD = "redis-default-S3cret-55aa"


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the agent is told to trust
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it must fail verification
    elsewhere_cert: Path  # signed by `ca`, but for another host name (other.example) only
    elsewhere_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed:\n{done.stderr}")


def serving(server: MosquittoServer | RedisServer) -> Iterator:
    """Start a broker for a fixture (a start failure fails the test), stop it afterwards."""
    try:
        server.start()
    except BrokerStartError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", f"/CN=GenCLIP test {name}", "-keyout", key, "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr, ext = (folder / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", key, "-out", csr, cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-days", "2",
        "-out", cert, "-extfile", ext, cwd=folder,
    )  # fmt: skip
    return cert, key


def make_pki(folder: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an unrelated CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    server = _leaf(
        folder,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    client = _leaf(
        folder, "client", ca, "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
    )
    other, _ = _ca(folder, "other-ca")
    elsewhere = _leaf(
        folder,
        "elsewhere",
        ca,
        "subjectAltName=DNS:other.example\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    return Pki(ca[0], server[0], server[1], client[0], client[1], other, *elsewhere)


class TlsMosquitto(MosquittoServer):
    """Mosquitto with only a TLS listener, no anonymous clients, and one user: MQTT_USER / MQTT_PASSWORD.

    `require_certificate`: clients must also present a certificate signed by the test CA.
    `elsewhere`: it presents a certificate of the right CA, issued for another host name.
    """

    def __init__(
        self, workdir: Path, pki: Pki, *, require_certificate: bool = False, elsewhere: bool = False, **kwargs
    ) -> None:
        self.pki = pki
        self.require_certificate = require_certificate
        self.cert, self.key = (
            (pki.elsewhere_cert, pki.elsewhere_key) if elsewhere else (pki.server_cert, pki.server_key)
        )
        super().__init__(workdir, **kwargs)

    def _command(self) -> list[str]:
        command = super()._command()
        passwords = self.workdir / "passwd"
        subprocess.run(
            ["mosquitto_passwd", "-b", "-c", str(passwords), MQTT_USER, MQTT_PASSWORD], check=True, capture_output=True
        )
        conf = self.workdir / "mosquitto.conf"
        text = conf.read_text().replace("allow_anonymous true", f"allow_anonymous false\npassword_file {passwords}")
        tls = [
            f"cafile {self.pki.ca}",
            f"certfile {self.cert}",
            f"keyfile {self.key}",
            f"require_certificate {'true' if self.require_certificate else 'false'}",
        ]
        text = text.replace("protocol mqtt", "protocol mqtt\n" + "\n".join(tls))
        conf.write_text(text)
        return command


class PasswordRedis(RedisServer):
    """redis-server whose default user needs REDIS_DEFAULT_PASSWORD (`requirepass`), with an ACL user
    REDIS_USER that may only PING, SELECT, XADD and SET on genclip:* keys: what the agent sends."""

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--requirepass",
            REDIS_DEFAULT_PASSWORD,
            "--user",
            *f"{REDIS_USER} on >{REDIS_PASSWORD} ~genclip:* resetchannels -@all +ping +select +xadd +set".split(),
        ]

    def _ready(self) -> bool:
        """Any answer to PING means it serves (it answers NOAUTH before AUTH)."""
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False
