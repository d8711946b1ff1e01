"""The OPC UA server a PLC reads results from (the optional extra `genclip-inspect[opcua]`, asyncua).

- config.py: the `[opcua]` section (importable without asyncua, so a plain install validates it);
- nodes.py: the address space as data: node ids, variable names and types, the result a PLC sees;
- handshake.py: one camera's result buffer and the ResultValid/ResultAck handshake (no asyncua);
- security.py: users and roles from the `opcua-users` credential, the per-role permission rules;
- certificate.py: the server's application instance certificate (`genclip opcua cert`);
- server.py: `OpcuaServer`, the line's OPC UA sink (a `Publisher`) on its own thread and asyncio loop.

Only config.py and nodes.py and handshake.py may be imported where asyncua may be missing;
`available()` says whether the extra is installed.
"""

from __future__ import annotations

import importlib.util

PIP_INSTALL = "pip install 'genclip-inspect[opcua]'"


def available() -> bool:
    """Whether asyncua (the `[opcua]` extra) is installed."""
    return importlib.util.find_spec("asyncua") is not None
