"""Who may connect to the OPC UA server and what each may do (asyncua's user manager and permission rules).

- The channel: Basic256Sha256 SignAndEncrypt only, with the server's certificate (agent/opcua/config.py).
  With `[opcua].trusted_clients_dir`, only the client certificates in that folder open a session
  (pinned: the exact certificate, DER or PEM files, read at start); without it any client certificate may.
- The user: user name and password from the users file (agent/opcua/users.py), compared in constant
  time; anonymous only with `allow_anonymous`, as a reader. A wrong password is refused at
  ActivateSession (BadUserAccessDenied) and logged with the user name.
- What a session may do: every request runs through `RolePermissions.check_validity` before it is
  served. Reads, browsing and subscriptions are every role's; a Write is allowed only when every node
  it writes is a `ResultAck` and the role may acknowledge; a Call only when every method it calls is
  one the role may call (`Trigger`: plc, operator; `SetThreshold`: operator). Anything else, and
  every node-management request, is refused with BadUserAccessDenied, the whole request.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import USER_TYPES, SimpleRoleRuleset, User, UserRole
from asyncua.server.user_managers import UserManager
from asyncua.ua.ua_binary import struct_from_binary
from cryptography import x509

from agent.logs import get_logger
from agent.opcua.certificate import trusted_certificates
from agent.opcua.ua_values import node_id
from agent.opcua.users import OpcuaUser, Role, can_set_threshold, can_trigger, can_write_ack

log = get_logger(__name__)

WRITE = node_id(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary)
CALL = node_id(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)
ALLOWED_REQUESTS = frozenset(node_id(t) for t in USER_TYPES)


class LineUsers(UserManager):
    """asyncua's user manager: the users file's users, and anonymous clients when allowed."""

    def __init__(self, users: Mapping[str, OpcuaUser], allow_anonymous: bool) -> None:
        self.users = dict(users)
        self.allow_anonymous = allow_anonymous

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username is None:
            return User(role=UserRole.Anonymous) if self.allow_anonymous else None
        user = self.users.get(username)
        given = (password or "").encode()
        expected = user.password.encode() if user is not None else b"\0" * 32
        if user is None or not hmac.compare_digest(given, expected):
            log.warning("opcua login refused", user=username[:64])
            return None
        return User(role=UserRole.User, name=user.name)

    def role(self, user: User) -> Role | None:
        if user.role == UserRole.Anonymous:
            return "reader" if self.allow_anonymous else None
        found = self.users.get(user.name or "")
        return found.role if found is not None else None


class RolePermissions(SimpleRoleRuleset):
    """The per-request check: reads for every role, writes and calls by role (module docstring)."""

    def __init__(self, users: LineUsers, ack_nodes: set[ua.NodeId], trigger_methods: set[ua.NodeId],
                 threshold_methods: set[ua.NodeId]) -> None:  # fmt: skip
        super().__init__()
        self.users = users
        self.ack_nodes = ack_nodes
        self.trigger_methods = trigger_methods
        self.threshold_methods = threshold_methods

    def check_validity(self, user: User, action_type_id: ua.NodeId, body: Any) -> bool:
        role = self.users.role(user)
        if role is None or action_type_id not in ALLOWED_REQUESTS:
            return False
        if action_type_id == WRITE:
            params = struct_from_binary(ua.WriteParameters, body.copy())
            return all(w.NodeId in self.ack_nodes for w in params.NodesToWrite) and can_write_ack(role)
        if action_type_id == CALL:
            calls = struct_from_binary(ua.CallParameters, body.copy())
            return all(self._may_call(role, c.MethodId) for c in calls.MethodsToCall)
        return True

    def _may_call(self, role: Role, method: ua.NodeId) -> bool:
        if method in self.trigger_methods:
            return can_trigger(role)
        if method in self.threshold_methods:
            return can_set_threshold(role)
        return False


class PinnedClients:
    """A certificate validator: only the client certificates found in a folder (exact match) are accepted."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.trusted = trusted_certificates(folder)

    async def __call__(self, cert: x509.Certificate, app_description: ua.ApplicationDescription) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        if cert.public_bytes(Encoding.DER) not in self.trusted:
            log.warning("opcua client certificate not trusted", subject=cert.subject.rfc4514_string()[:200])
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
