"""`genclip line`: talk to a running line over its broker, without mosquitto clients and jq.

    genclip line info --config /etc/genclip/line-1.toml --username genclip-operator --password-file ~/.op
    genclip line threshold widget 0.7 --config /etc/genclip/line-1.toml --username genclip-operator

`info` reads the retained `<prefix>/<line>/info` and `status` and prints a summary (`--json`: the info document
as the agent published it). `reload`, `threshold`, `pause`, `resume` and `snapshot` send the MQTT command of that
name (docs/integration.md, "Commands") with CorrelationData and a ResponseTopic below `cmd/response/`, wait for
the line's answer and print it (cli/line_client.py). Broker address, TLS, topic prefix and line id come from
the line's config; the account is the operator's (`--username`, `--password-file` or
$GENCLIP_OPERATOR_PASSWORD), never [mqtt].username: the shipped broker ACL refuses commands from the agent's
own account.

Exit codes: 0 done (ok), 1 the line refused the command (its error is printed), 2 bad arguments, config or
credentials (the broker refused the login or the command), 3 no answer: the broker could not be reached, or the
line did not answer in `--timeout` seconds (the message says which).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated

import typer

from cli.line_client import Answer, BrokerRefusedError, LineError, LineSession, LineView, NoAnswerError, Operator
from cli.options import ConfigOption, fail, load_or_exit

PASSWORD_ENV = "GENCLIP_OPERATOR_PASSWORD"
NO_ANSWER = 3
REFUSED = 1

line_app = typer.Typer(
    help="Talk to a running line over MQTT: its status and settings (info), and the operator's commands "
    "(reload, threshold, pause, resume, snapshot). Exit codes: 0 ok, 1 the line refused (its reason is printed), "
    "2 bad arguments, config or credentials, 3 the broker or the line did not answer.",
    no_args_is_help=True,
)

LineOption = Annotated[
    str | None, typer.Option("--line", help="The line to talk to; default the config's [line].id.", show_default=False)
]
UsernameOption = Annotated[
    str | None,
    typer.Option(
        "--username",
        "-u",
        help="The operator's broker account (e.g. genclip-operator), not the agent's [mqtt].username: the shipped "
        "ACL refuses commands from the agent's account. Default: none (anonymous).",
        show_default=False,
    ),
]
PasswordFileOption = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help=f"File holding the operator's password (first line); default ${PASSWORD_ENV}, else none.",
        show_default=False,
    ),
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, max=600.0, help="Seconds to wait for the broker and the line.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the line's answer (info: its info) as JSON.")]
CertOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert", help="The operator's TLS client certificate, where the broker asks for one.", show_default=False
    ),
]
KeyOption = Annotated[Path | None, typer.Option("--tls-key", help="Its private key.", show_default=False)]


def _open(
    config: Path | None,
    line: str | None,
    username: str | None,
    password_file: Path | None,
    timeout: float,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> LineSession:
    """The session for the sub-verbs: the line's broker settings, the operator's account (or exit 2)."""
    cfg = load_or_exit(config)
    password = _password(password_file)
    if password is not None and username is None:
        fail("a password needs an account: give --username (the operator's broker account)")
    for option, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not Path(os.path.expanduser(path)).is_file():
            fail(f"{option}: file not found: {path}")
    operator = Operator(username=username, password=password, cert_file=tls_cert, key_file=tls_key)
    try:
        return LineSession(cfg.mqtt, line or cfg.line.id, operator, timeout)
    except BrokerRefusedError as exc:
        fail(str(exc))


def _password(password_file: Path | None) -> str | None:
    if password_file is None:
        return os.environ.get(PASSWORD_ENV) or None
    try:
        text = Path(os.path.expanduser(password_file)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--password-file: cannot read {password_file}: {exc}")
    return text.splitlines()[0] if text.strip() else fail(f"--password-file: {password_file} is empty")


def _run(session: LineSession, act: Callable[[LineSession], None]) -> None:
    """Open the session, do `act`, and turn what went wrong into its exit code."""
    try:
        with session:
            act(session)
    except BrokerRefusedError as exc:
        fail(str(exc))
    except (NoAnswerError, LineError) as exc:
        fail(str(exc), NO_ANSWER)


def _command(
    session: LineSession, name: str, args: dict[str, object], as_json: bool, done: Callable[[Answer], str]
) -> None:
    """Send one command, print the answer (or the refusal, exit 1)."""

    def act(s: LineSession) -> None:
        answer = s.request(name, args)
        if as_json:
            typer.echo(json.dumps(answer, indent=2, ensure_ascii=False))
        if not answer["ok"]:
            typer.echo(f"error: line {s.line!r} refused {name}: {answer.get('error', '(no reason given)')}", err=True)
            raise typer.Exit(REFUSED)
        if not as_json:
            typer.echo(done(answer))

    _run(session, act)


# --- the sub-verbs ----------------------------------------------------------------------------------------
@line_app.command("info")
def info(
    config: ConfigOption = None,
    line: LineOption = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    timeout: TimeoutOption = 10.0,
    as_json: JsonOption = False,
    tls_cert: CertOption = None,
    tls_key: KeyOption = None,
) -> None:
    """The line's status and reasons, prompt version, cameras and classes (its retained info and status)."""
    session = _open(config, line, username, password_file, timeout, tls_cert, tls_key)

    def act(s: LineSession) -> None:
        view = s.read()
        if view.info is None:
            raise NoAnswerError(
                f"nothing retained on {s.topics.topic('info')} (status: {view.status or 'none retained'}): has the "
                f"agent of line {s.line!r} run against {s.config.host}:{s.config.port}? Check --line, [line].id "
                "and [mqtt].topic_prefix"
            )
        typer.echo(json.dumps(view.info, indent=2, ensure_ascii=False) if as_json else describe(view))

    _run(session, act)


@line_app.command("reload")
def reload(
    config: ConfigOption = None,
    line: LineOption = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    timeout: TimeoutOption = 10.0,
    as_json: JsonOption = False,
    tls_cert: CertOption = None,
    tls_key: KeyOption = None,
) -> None:
    """Load the newest published prompt checkpoint and re-read the class profiles (as SIGHUP does)."""
    session = _open(config, line, username, password_file, timeout, tls_cert, tls_key)
    _command(session, "reload", {}, as_json, _describe_reload)


@line_app.command("threshold")
def threshold(
    product_class: Annotated[str, typer.Argument(metavar="CLASS", help="The product class, as the line names it.")],
    value: Annotated[str, typer.Argument(metavar="VALUE", help="The image-score threshold, 0 to 1.")],
    config: ConfigOption = None,
    line: LineOption = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    timeout: TimeoutOption = 10.0,
    as_json: JsonOption = False,
    tls_cert: CertOption = None,
    tls_key: KeyOption = None,
) -> None:
    """Set one class's threshold; it wins over [thresholds] and calibration and is kept across a restart."""
    number = _threshold_value(value)
    session = _open(config, line, username, password_file, timeout, tls_cert, tls_key)

    def done(answer: Answer) -> str:
        return (
            f"ok: {answer.get('product_class')} threshold {answer.get('threshold')} (source command; kept across "
            "a restart until the class's [thresholds] value in config changes)"
        )

    _command(session, "threshold", {"class": product_class, "value": number}, as_json, done)


@line_app.command("pause")
def pause(
    camera: Annotated[str | None, typer.Argument(help="The camera to pause; default every camera.")] = None,
    config: ConfigOption = None,
    line: LineOption = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    timeout: TimeoutOption = 10.0,
    as_json: JsonOption = False,
    tls_cert: CertOption = None,
    tls_key: KeyOption = None,
) -> None:
    """Stop scoring a camera (or all): a live camera's parts are answered ERROR (paused), a folder waits."""
    session = _open(config, line, username, password_file, timeout, tls_cert, tls_key)
    args: dict[str, object] = {} if camera is None else {"camera": camera}
    _command(session, "pause", args, as_json, lambda a: f"ok: paused {_names(a.get('cameras'))}")


@line_app.command("resume")
def resume(
    camera: Annotated[str | None, typer.Argument(help="The camera to resume; default every camera.")] = None,
    config: ConfigOption = None,
    line: LineOption = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    timeout: TimeoutOption = 10.0,
    as_json: JsonOption = False,
    tls_cert: CertOption = None,
    tls_key: KeyOption = None,
) -> None:
    """Score a paused camera's parts again (or every camera's)."""
    session = _open(config, line, username, password_file, timeout, tls_cert, tls_key)
    args: dict[str, object] = {} if camera is None else {"camera": camera}
    _command(session, "resume", args, as_json, lambda a: f"ok: resumed {_names(a.get('cameras'))}")


@line_app.command("confirm-good")
def confirm_good(
    parts: Annotated[list[str], typer.Argument(help="Part ids confirmed good (among the line's last scored parts).")],
    config: ConfigOption = None,
    line: LineOption = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    timeout: TimeoutOption = 10.0,
    as_json: JsonOption = False,
    tls_cert: CertOption = None,
    tls_key: KeyOption = None,
) -> None:
    """Add parts a person confirmed good to their class's memory of good patches ([agent].confirm_good)."""
    session = _open(config, line, username, password_file, timeout, tls_cert, tls_key)

    def done(answer: Answer) -> str:
        grown = _mapping(answer.get("classes"))
        lines = [f"  {name}: {_mapping(m).get('images')} images in the memory" for name, m in grown.items()]
        unknown = answer.get("unknown_parts") or []
        if unknown:
            lines.append(f"  not among the recent parts: {_names(unknown)}")
        return "\n".join(["ok: added to the patch memory", *lines])

    _command(session, "confirm-good", {"parts": parts}, as_json, done)


@line_app.command("snapshot")
def snapshot(
    config: ConfigOption = None,
    line: LineOption = None,
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    timeout: TimeoutOption = 10.0,
    as_json: JsonOption = False,
    tls_cert: CertOption = None,
    tls_key: KeyOption = None,
) -> None:
    """Have the line publish its retained info again, and print it."""
    session = _open(config, line, username, password_file, timeout, tls_cert, tls_key)

    def done(answer: Answer) -> str:
        document = answer.get("info")
        body = describe(LineView(document, None)) if isinstance(document, dict) else "(no info in the answer)"
        return f"ok: info re-published\n{body}"

    _command(session, "snapshot", {}, as_json, done)


# --- what people read -------------------------------------------------------------------------------------
def _threshold_value(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        fail(f"VALUE {value!r} is not a number: give a threshold from 0 to 1, e.g. 0.7")
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        fail(f"VALUE {value!r} is out of range: a threshold is from 0 to 1")
    return number


def _names(value: object) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, list) and value else "no camera"


def _describe_reload(answer: Answer) -> str:
    lines = [f"ok: prompt version {answer.get('prompt_version')}"]
    profiles = answer.get("profiles")
    for entry in profiles if isinstance(profiles, list) else []:
        lines.append(f"  profile: {json.dumps(entry, ensure_ascii=False)}")
    if not profiles:
        lines.append("  class profiles: none changed")
    return "\n".join(lines)


def describe(view: LineView) -> str:
    """The info document (and the retained status word) as a few lines for people."""
    info = view.info or {}
    state = _mapping(info.get("status"))
    published_state = state.get("state")
    head = f"line {info.get('line')}" + (f" ({info['name']})" if info.get("name") else "")
    lines = [f"{head}: {view.status or published_state or 'unknown'}"]
    if view.status is not None and published_state is not None and view.status != published_state:
        lines.append(f"  (the info below was published while the line was {published_state}: it may be old)")
    reasons = state.get("reasons")
    for reason in reasons if isinstance(reasons, list) else []:
        lines.append(f"  reason: {reason}")
    model = _mapping(info.get("model"))
    lines.append(
        f"agent {info.get('version')}, started {info.get('started_at')}; prompt version {model.get('prompt_version')}"
        f" on {model.get('device')}"
        + (f"; last reload refused: {model['last_reload_error']}" if model.get("last_reload_error") else "")
    )
    lines.append("cameras:")
    cameras = info.get("cameras")
    for camera in cameras if isinstance(cameras, list) else []:
        cam = _mapping(camera)
        flags = ", ".join(
            str(x) for x in (cam.get("state"), "paused" if cam.get("paused") else None, cam.get("acquisition")) if x
        )
        detail = f" - {cam['detail']}" if cam.get("detail") else ""
        lines.append(f"  {cam.get('id')}  class {cam.get('product_class')}  {flags}{detail}")
    lines.append("classes:")
    for name, entry in _mapping(info.get("classes")).items():
        cls = _mapping(entry)
        if "error" in cls:
            lines.append(f"  {name}  not set up: {cls['error']}")
            continue
        value = cls.get("threshold")
        shown = f"{value:.4f}" if isinstance(value, int | float) else str(value)
        lines.append(f"  {name}  threshold {shown} ({cls.get('threshold_source')})")
    return "\n".join(lines)


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, dict) else {}
