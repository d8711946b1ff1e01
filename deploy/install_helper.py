"""The parts of deploy/install.sh that are easier in Python (standard library only, Python >= 3.11).

    python3.11 deploy/install_helper.py line-config --line NAME --template config.toml --out /etc/genclip/NAME.toml
    python3.11 deploy/install_helper.py relocate --venv DIR --from STAGED --to FINAL

`line-config` writes a line's config from the repository's config.toml: line.id set, the paths
pointing at the installed layout (/var/lib/genclip/{prompts,profiles,reference,runs}/<line>/,
/srv/genclip/<line>/), a health port no other config in the folder uses. It refuses to replace an
existing file (install.sh never overwrites a config) and fails, naming the anchor, when config.toml
no longer has a line it edits (so a changed config.toml cannot silently produce a wrong config).

`relocate` rewrites a virtual environment built at STAGED (scripts' shebangs, bin/activate*,
pyvenv.cfg) to work at FINAL, where it will live: install.sh builds the venv beside the running one
(and, with --root, under a staging root) and moves it into place afterwards.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import tomllib
from pathlib import Path

STATE = "/var/lib/genclip"
SRV = "/srv/genclip"
CREDENTIALS = "/etc/genclip/credentials"
FIRST_HEALTH_PORT = 8321
LINE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class TemplateError(RuntimeError):
    pass


def edit(text: str, pattern: str, replacement: str, count: int = 1) -> str:
    """Replace `pattern` (a regex, multi-line mode) exactly `count` times, or fail naming it.
    A comment after the replaced text stays in its column where there is room."""

    def keep_column(match: re.Match[str]) -> str:
        old, pad = match.group(1), match.group(2)
        if not pad or not text.startswith("#", match.end()):
            return replacement + pad
        return replacement + " " * max(1, len(old) + len(pad) - len(replacement))

    new, found = re.subn(rf"({pattern})( *)", keep_column, text, flags=re.MULTILINE)
    if found != count:
        raise TemplateError(f"config template: expected {count} match(es) of {pattern!r}, found {found}")
    return new


def used_health_ports(folder: Path, skip: Path) -> set[int]:
    ports = set()
    for path in sorted(folder.glob("*.toml")):
        if path == skip:
            continue
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            ports.add(int(data.get("agent", {}).get("health_port", FIRST_HEALTH_PORT)))
        except (OSError, ValueError, tomllib.TOMLDecodeError):
            continue  # not ours to judge; `genclip config check` will
    return ports


def line_config(template: str, line: str, health_port: int) -> str:
    """config.toml, made into the config of `line` in the installed layout."""
    edits = [
        (r'^id = "line-1"', f'id = "{line}"', 1),
        (r'^name = "[^"\n]*"', f'name = "{line}"', 1),
        (r'^# cache_dir = "/var/lib/genclip/hf-cache"', f'cache_dir = "{STATE}/hf-cache"', 1),
        (
            r'^# checkpoint = "/var/lib/genclip/prompts/line-1\.safetensors"',
            f'# checkpoint = "{STATE}/prompts/{line}"',
            1,
        ),
        (r'^# profile_dir = "/var/lib/genclip/profiles"', f'profile_dir = "{STATE}/profiles/{line}"', 1),
        (r"/srv/line-1/frames", f"{SRV}/{line}/frames", 3),
        (r'^# widget = "/var/lib/genclip/reference/widget"', f'# widget = "{STATE}/reference/{line}/widget"', 1),
        (r'^# username = "genclip-line-1"', f'# username = "genclip-{line}"', 1),
        (r"^health_port = 8321\b", f"health_port = {health_port}", 1),
        (r'^# prompt_dir = "/var/lib/genclip/prompts"', f'prompt_dir = "{STATE}/prompts/{line}"', 1),
        (r"/var/lib/genclip/data/line-1@all", f"{STATE}/data/{line}@all", 1),
        (r'^out_dir = "runs"', f'out_dir = "{STATE}/runs/{line}"', 1),
        (r'^# publish_dir = "/var/lib/genclip/prompts"', f'publish_dir = "{STATE}/prompts/{line}"', 1),
    ]
    for name in ("mqtt", "redis"):
        edits.append(
            (
                rf'^# password_file = "/etc/genclip/{name}-password".*$',
                f"# password: put it into {CREDENTIALS}/{line}/{name}-password (empty = none); the unit hands it\n"
                f"# over as the systemd credential {name}-password. password_file is not needed.",
                1,
            )
        )
    text = template
    for pattern, replacement, count in edits:
        text = edit(text, pattern, replacement, count)
    header = (
        f"# Line {line}: written by deploy/install.sh from the repository's config.toml (install.sh never\n"
        f"# overwrites it). Service: genclip@{line}; check: genclip config check --config /etc/genclip/{line}.toml\n"
        "#\n"
    )
    text = header + text
    if line != "line-1" and "line-1" in text:
        raise TemplateError("config template: 'line-1' left in the line's config; install_helper.py needs updating")
    data = tomllib.loads(text)
    if data["line"]["id"] != line or data["agent"]["prompt_dir"] != f"{STATE}/prompts/{line}":
        raise TemplateError("config template: the written config does not say what was meant")
    return text


def cmd_line_config(args: argparse.Namespace) -> int:
    if not LINE_ID.fullmatch(args.line):
        print(f"install_helper: bad line name {args.line!r}", file=sys.stderr)
        return 2
    out: Path = args.out
    if out.exists():
        print(f"{out}: exists, left as it is")
        return 0
    used = used_health_ports(out.parent, out)
    port = next(p for p in range(FIRST_HEALTH_PORT, 65536) if p not in used)
    try:
        text = line_config(args.template.read_text(encoding="utf-8"), args.line, port)
    except TemplateError as exc:
        print(f"install_helper: {exc}", file=sys.stderr)
        return 1
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o640)
        os.link(tmp, out)  # fails if the file appeared meanwhile: never overwrite
    finally:
        os.unlink(tmp)
    print(f"{out}: written (health port {port})")
    return 0


def cmd_relocate(args: argparse.Namespace) -> int:
    venv: Path = args.venv
    old, new = args.from_.rstrip("/").encode(), args.to.rstrip("/").encode()
    targets = [venv / "pyvenv.cfg", *sorted((venv / "bin").iterdir())]
    changed = 0
    for path in targets:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old not in data or b"\0" in data[:4096]:
            continue
        path.write_bytes(data.replace(old, new))
        changed += 1
    print(f"relocated {changed} file(s) of {venv} to {args.to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("line-config", help="write /etc/genclip/<line>.toml from config.toml")
    p.add_argument("--line", required=True)
    p.add_argument("--template", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_line_config)
    p = verbs.add_parser("relocate", help="make a venv built at --from work at --to")
    p.add_argument("--venv", type=Path, required=True)
    p.add_argument("--from", dest="from_", required=True)
    p.add_argument("--to", required=True)
    p.set_defaults(func=cmd_relocate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
