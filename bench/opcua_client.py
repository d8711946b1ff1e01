"""An OPC UA client as a PLC would run it, for `genclip bench agent` and the tests (needs the extra `opcua`).

`make_credentials` writes what a line's OPC UA server and its clients need into a folder: the server's
certificate and key (agent/opcua/certificate.py), a client certificate and a users file with one user
per role. `secure_client` opens a Basic256Sha256 SignAndEncrypt client with that certificate and a
user's name and password.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.opcua.certificate import CertificateFiles, write_certificate

CLIENT_URI = "urn:genclip-inspect:test-client"
PASSWORDS = {"plc": "plc-secret-1", "operator": "operator-secret-1", "reader": "reader-secret-1"}


@dataclass(frozen=True, slots=True)
class OpcuaCredentials:
    server: CertificateFiles
    client: CertificateFiles
    users: Path

    def config(self, port: int, **keys: Any) -> dict[str, Any]:
        """The `[opcua]` section for a server on 127.0.0.1:`port` with these files."""
        return {
            "enabled": True,
            "host": "127.0.0.1",
            "port": port,
            "certificate_file": str(self.server.certificate),
            "private_key_file": str(self.server.private_key),
            "users_file": str(self.users),
            **keys,
        }


def make_credentials(folder: Path, line: str) -> OpcuaCredentials:
    """Server and client certificates and a users file (users `plc`, `operator`, `reader`, see PASSWORDS)."""
    server = write_certificate(folder / "server", f"urn:genclip-inspect:{line}", overwrite=True)
    client = write_certificate(folder / "client", CLIENT_URI, client=True, overwrite=True)
    users = folder / "opcua-users"
    users.write_text("".join(f"{role}:{role}:{password}\n" for role, password in PASSWORDS.items()))
    return OpcuaCredentials(server, client, users)


async def secure_client(url: str, credentials: OpcuaCredentials, user: str | None, password: str | None = None) -> Any:
    """An asyncua Client (not yet connected) on SignAndEncrypt, logging in as `user` (None: anonymous)."""
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    client = Client(url, timeout=10)
    client.application_uri = CLIENT_URI
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(credentials.client.certificate),
        str(credentials.client.private_key),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if user is not None:
        client.set_user(user)
        client.set_password(password or PASSWORDS.get(user, "no-such-user"))
    return client
