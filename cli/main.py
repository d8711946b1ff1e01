"""`genclip`: the one command line for a production line's inspection agent.

The root and the order of its verbs; each verb is a function in its own module:
`run` (cli/run.py), `score` (cli/score.py), `train`, `synth`, `calibrate`, `eval`, `publish`
(cli/train.py, cli/synth.py, cli/calibrate.py, cli/evaluate.py, cli/publish.py), `config check|show`
(cli/config.py), `export onnx` (cli/export.py), `bench engine|agent` (cli/bench.py), `opcua cert` (cli/opcua.py) and
`line info|reload|threshold|pause|resume|snapshot` (cli/line.py: the operator's commands over MQTT).
Heavy imports (torch) happen inside the verbs that need them, so `genclip config check`
stays quick.
"""

from __future__ import annotations

from typing import Annotated

import typer

from agent import __version__
from cli import bench, calibrate, config, evaluate, export, line, opcua, publish, run, score, synth, train

app = typer.Typer(
    name="genclip",
    help="GenCLIP Inspect: zero-shot visual inspection for production lines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"genclip-inspect {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """GenCLIP Inspect: zero-shot visual inspection for production lines."""


# The order here is the order `genclip --help` lists them in: verbs, then groups of verbs.
app.command("run")(run.run)
app.command("score", help=score.SCORE_HELP)(score.score)
app.command("train")(train.train)
app.command("synth")(synth.synth)
app.command("calibrate")(calibrate.calibrate)
app.command("eval")(evaluate.evaluate_command)
app.command("publish")(publish.publish)
app.add_typer(config.config_app, name="config")
app.add_typer(export.export_app, name="export", help="Export the engine to other runtimes (onnx).")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(opcua.opcua_app, name="opcua")
app.add_typer(line.line_app, name="line")


def main() -> None:
    app()
