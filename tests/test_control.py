"""The command parser: every documented command parses, everything else is a CommandError and nothing else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control import ARGS, Command, CommandError, parse_command


@pytest.mark.parametrize(
    ("name", "payload", "expected"),
    [
        ("reload", b"", {}),
        ("reload", b"{}", {}),
        ("reload", b"  \n", {}),
        ("threshold", b'{"class": "pcb", "value": 0.62}', {"class": "pcb", "value": 0.62}),
        ("threshold", b'{"class": "pcb", "value": 1}', {"class": "pcb", "value": 1.0}),
        ("pause", b"{}", {"camera": None}),
        ("pause", b'{"camera": "cam-2"}', {"camera": "cam-2"}),
        ("resume", b"", {"camera": None}),
        ("snapshot", b"", {}),
    ],
)
def test_valid_commands(name: str, payload: bytes, expected: dict) -> None:
    command = parse_command(name, payload, correlation=b"c1")
    assert command == Command(name=name, args=command.args, correlation=b"c1")
    assert command.args.model_dump(by_alias=True) == expected


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("explode", b"{}", "unknown command"),
        ("", b"{}", "unknown command"),
        ("reload", b"{", "not valid JSON"),
        ("reload", b"\xff\xfe\x00", "not valid JSON"),
        ("reload", b"[]", "must be a JSON object"),
        ("reload", b'"reload"', "must be a JSON object"),
        ("reload", b'{"now": true}', "now: unknown field"),
        ("threshold", b'{"value": 0.5}', "class: Field required"),
        ("threshold", b'{"class": "pcb", "value": "0.5"}', "value:"),
        ("threshold", b'{"class": "pcb", "value": true}', "value:"),
        ("threshold", b'{"class": "pcb", "value": -0.1}', "greater than or equal to 0"),
        ("threshold", b'{"class": "pcb", "value": NaN}', "finite"),
        ("threshold", b'{"class": "", "value": 0.5}', "class:"),
        ("threshold", b'{"class_": "pcb", "value": 0.5}', "unknown field"),
        ("pause", b'{"camera": 2}', "camera:"),
        ("pause", b'{"camera": "' + b"c" * 5000 + b'"}', "exceeds the limit of 4096"),
        ("reload", b"[" * 3000, "not valid JSON"),
    ],
)
def test_invalid_commands(name: str, payload: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        parse_command(name, payload)


def test_max_bytes_is_configurable() -> None:
    payload = json.dumps({"camera": "c" * 100}).encode()
    assert parse_command("pause", payload, max_bytes=len(payload)).args.camera == "c" * 100  # type: ignore[attr-defined]
    with pytest.raises(CommandError, match="exceeds"):
        parse_command("pause", payload, max_bytes=len(payload) - 1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
names = st.sampled_from([*ARGS, "response", "x"]) | st.text(max_size=20)
keys = st.sampled_from(["class", "value", "camera", "extra"]) | st.text(max_size=6)
payloads = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(keys, json_values, max_size=3).map(lambda v: json.dumps(v).encode())
)


@settings(max_examples=400, deadline=None)
@given(name=names, payload=payloads)
def test_parse_command_never_raises_anything_else(name: str, payload: bytes) -> None:
    try:
        command = parse_command(name, payload)
    except CommandError as exc:
        assert str(exc)
    else:
        assert command.name == name and isinstance(command.args, ARGS[name])
