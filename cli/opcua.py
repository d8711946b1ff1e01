"""`genclip opcua cert`: the OPC UA server's certificate and key, for development, tests and lines installed by hand.

    genclip opcua cert --config /etc/genclip/line-1.toml --out /etc/genclip/credentials/line-1

writes `opcua-cert.der` and `opcua-key.pem` (0600) for the config's line, with its application URI
([opcua].application_uri, default urn:genclip-inspect:<line id>) and this host's name. deploy/install.sh
makes the same per line with openssl; point [opcua].certificate_file and private_key_file at the files,
or name them opcua-cert and opcua-key in the line's credentials folder. Needs the extra `opcua`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agent.opcua import PIP_INSTALL, available
from cli.options import ConfigOption, load_or_exit

opcua_app = typer.Typer(help="The OPC UA server's certificate (docs/integration.md#opc-ua).", no_args_is_help=True)


@opcua_app.command("cert")
def cert(
    out: Annotated[Path, typer.Option("--out", help="Folder for opcua-cert.der and opcua-key.pem.")],
    config: ConfigOption = None,
    hostname: Annotated[str | None, typer.Option(help="DNS name in the certificate; default this host's.")] = None,
    days: Annotated[int, typer.Option(min=1, max=36500, help="Validity in days.")] = 3650,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Write a self-signed application instance certificate for the line's OPC UA server."""
    if not available():
        typer.echo(f"error: the OPC UA extra is not installed: {PIP_INSTALL}", err=True)
        raise typer.Exit(2)
    from agent.opcua.certificate import write_certificate

    cfg = load_or_exit(config)
    uri = cfg.opcua.application(cfg.line.id)
    name = f"GenCLIP Inspect {cfg.line.id}"
    try:
        files = write_certificate(out, uri, hostname=hostname, common_name=name, days=days, overwrite=force)
    except FileExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {files.certificate} and {files.private_key} (application URI {uri}, {days} days)")
