"""The `[opcua]` section: the OPC UA server PLCs read results from (off by default; extra `[opcua]`).

Files come like the broker passwords (agent/publish/config.py): a path in the config, else the
systemd credential of the same name in `$CREDENTIALS_DIRECTORY` (`opcua-cert`, `opcua-key`,
`opcua-users`), which deploy/install.sh creates per line (the certificate and key generated there).
With `enabled = true` everything is checked when the config is read (so at `genclip config check`):
the extra is installed, the certificate and key are readable and not empty, the users file parses,
every file in `trusted_clients_dir` is a certificate.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from agent.opcua import PIP_INSTALL, available
from agent.opcua.users import UsersFileError, read_users
from agent.section import Section

CERT_CREDENTIAL = "opcua-cert"
KEY_CREDENTIAL = "opcua-key"
USERS_CREDENTIAL = "opcua-users"


def credential_file(path: Path | None, credential: str) -> Path | None:
    """The configured file, else `$CREDENTIALS_DIRECTORY/<credential>` when it exists, else None."""
    if path is not None:
        return Path(os.path.expanduser(path))
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if folder and (Path(folder) / credential).is_file():
        return Path(folder) / credential
    return None


class OpcuaConfig(Section):
    enabled: bool = Field(False, description="Run the OPC UA server (needs the extra: genclip-inspect[opcua]).")
    host: str = Field("0.0.0.0", description="Address the server listens on; the endpoint is opc.tcp://host:port/.")
    port: int = Field(4840, ge=0, le=65535, description="TCP port; 4840 is OPC UA's; 0 = any free port (tests).")
    namespace_uri: str | None = Field(
        None, description="The namespace of the line's nodes; default urn:genclip-inspect:<line id>."
    )
    application_uri: str | None = Field(
        None,
        description="The server's ApplicationUri, which the certificate's subjectAltName URI must equal; "
        "default urn:genclip-inspect:<line id> (what install.sh and `genclip opcua cert` write).",
    )
    certificate_file: Path | None = Field(
        None, description="Server certificate, DER or PEM; default the credential opcua-cert."
    )
    private_key_file: Path | None = Field(
        None, description="Its private key, PEM without passphrase; default the credential opcua-key."
    )
    users_file: Path | None = Field(
        None, description="name:role:password lines (roles reader, plc, operator); default the credential opcua-users."
    )
    allow_anonymous: bool = Field(
        False, description="Let clients without user name in, with the reader role (read and subscribe only)."
    )
    trusted_clients_dir: Path | None = Field(
        None,
        description="A folder of client certificates (DER or PEM): only those clients may connect. Default: any "
        "client certificate may open the encrypted channel; user and password decide what it may do.",
    )
    handshake: bool = Field(
        True,
        description="true: each camera presents its oldest unacknowledged result until the PLC acknowledges it "
        "(ResultValid/ResultAck); false: every result is presented as it comes, ResultAck is ignored.",
    )
    result_buffer: int = Field(
        8, ge=1, le=1000, description="Unacknowledged results kept per camera (the presented one included)."
    )
    queue_size: int = Field(
        1000, ge=1, le=100_000, description="Results waiting for the server's thread; the oldest are dropped beyond."
    )

    def namespace(self, line: str) -> str:
        return self.namespace_uri or f"urn:genclip-inspect:{line}"

    def application(self, line: str) -> str:
        return self.application_uri or f"urn:genclip-inspect:{line}"

    @property
    def certificate_path(self) -> Path | None:
        return credential_file(self.certificate_file, CERT_CREDENTIAL)

    @property
    def private_key_path(self) -> Path | None:
        return credential_file(self.private_key_file, KEY_CREDENTIAL)

    @property
    def users_path(self) -> Path | None:
        return credential_file(self.users_file, USERS_CREDENTIAL)

    @property
    def trusted_clients_path(self) -> Path | None:
        """trusted_clients_dir with `~` expanded (the server reads this one)."""
        return Path(os.path.expanduser(self.trusted_clients_dir)) if self.trusted_clients_dir is not None else None

    @model_validator(mode="after")
    def _usable(self) -> OpcuaConfig:
        """With the server on: the extra, the certificate, the key and the users, or an error saying what to do."""
        if not self.enabled:
            return self
        if not available():
            raise ValueError(f"enabled = true needs the OPC UA extra, which is not installed: {PIP_INSTALL}")
        for what, path, credential in (
            ("certificate_file", self.certificate_path, CERT_CREDENTIAL),
            ("private_key_file", self.private_key_path, KEY_CREDENTIAL),
        ):
            _check_pem_or_der(what, path, credential)
        users = self.users_path
        if users is None and not self.allow_anonymous:
            raise ValueError(
                f"no users: set users_file or provide the credential {USERS_CREDENTIAL} (name:role:password lines), "
                "or allow_anonymous = true (read only)"
            )
        if users is not None:
            try:
                read_users(users)
            except UsersFileError as exc:
                raise ValueError(str(exc)) from None
        _check_trusted_clients(self.trusted_clients_path)
        return self


def _check_trusted_clients(folder: Path | None) -> None:
    """Every file in the folder must be a certificate: the server reads them all at start."""
    from agent.opcua.certificate import trusted_certificates

    if folder is None:
        return
    if not folder.is_dir():
        raise ValueError(f"trusted_clients_dir: not a folder: {folder}")
    try:
        trusted_certificates(folder)
    except ValueError as exc:
        raise ValueError(f"trusted_clients_dir: {exc}") from None


def _check_pem_or_der(what: str, path: Path | None, credential: str) -> None:
    fix = "generate them with `genclip opcua cert --out DIR` (deploy/install.sh does it per line)"
    if path is None:
        raise ValueError(f"{what}: not set and no credential {credential}; {fix}")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if size == 0:
        raise ValueError(f"{what}: {path} is empty; {fix}")
