"""Who may use the OPC UA server, and what each role may do (no asyncua here: `config check` reads it too).

The users come from one file, the `opcua-users` credential (`[opcua].users_file`, else
`$CREDENTIALS_DIRECTORY/opcua-users`), one user a line:

    # name:role:password
    plc-line-1:plc:a long random password
    hmi-line-1:operator:another one
    scada:reader:and another

Blank lines and lines starting with `#` are skipped; the password is the rest of the line after the
second `:` (it may contain `:`), surrounding white space stripped. The file is read at start (root
0600 under /etc/genclip/credentials/<line>/, handed to the service by systemd like the broker passwords).

Roles, each with the rights of the ones before it:
- `reader`: browse, read, subscribe to variables and events (anonymous clients get this role when
  `[opcua].allow_anonymous` is true);
- `plc`: also write `ResultAck` and call `Trigger(partId)`: what a PLC needs for the handshake and triggers;
- `operator`: also call `SetThreshold(class, value)`, which changes the line's inspection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Role = Literal["reader", "plc", "operator"]
ROLES: tuple[Role, ...] = get_args(Role)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")


class UsersFileError(ValueError):
    """The users file cannot be used; the message names the line."""


@dataclass(frozen=True, slots=True)
class OpcuaUser:
    name: str
    role: Role
    password: str  # compared in constant time (agent/opcua/security.py); never logged

    def __repr__(self) -> str:
        return f"OpcuaUser(name={self.name!r}, role={self.role!r})"


def can_write_ack(role: Role) -> bool:
    return role in ("plc", "operator")


def can_trigger(role: Role) -> bool:
    return role in ("plc", "operator")


def can_set_threshold(role: Role) -> bool:
    return role == "operator"


def parse_users(text: str, source: str = "users file") -> dict[str, OpcuaUser]:
    """name -> user from the file's text; UsersFileError naming the line of the first problem."""
    users: dict[str, OpcuaUser] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise UsersFileError(f"{source} line {number}: expected name:role:password")
        name, role, password = parts[0].strip(), parts[1].strip(), parts[2].strip()
        if not NAME.fullmatch(name):
            raise UsersFileError(f"{source} line {number}: bad user name {name[:40]!r} (letters, digits, _.@-)")
        if role not in ROLES:
            raise UsersFileError(f"{source} line {number}: role {role[:20]!r} is not one of {', '.join(ROLES)}")
        if len(password) < 8:
            raise UsersFileError(f"{source} line {number}: the password of {name} has under 8 characters")
        if name in users:
            raise UsersFileError(f"{source} line {number}: user {name} is listed twice")
        users[name] = OpcuaUser(name, role, password)
    return users


def read_users(path: Path) -> dict[str, OpcuaUser]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"cannot read the OPC UA users file {path}: {exc}") from None
    return parse_users(text, str(path))
