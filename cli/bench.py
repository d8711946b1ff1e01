"""`genclip bench`: speed figures a user can reproduce (docs/benchmarks.md).

    genclip bench engine --backbone genclip-tiny --backbone ViT-B-16 --threads 1 --rounds 5
    genclip bench engine --backbone ViT-B-16 --image-size 512 --batch 1 --batch 8 --json > b16-512.json
    genclip bench agent --cameras 4 --fps 5 --seconds 60

Figures go to stdout (a table, or one JSON document with --json); logs go to stderr.
Nothing is asserted: speed is reported, never tested against a clock. The measuring is
bench/'s (`bench.engine.run_bench`, `bench.agent.run_agent_bench`); these verbs parse and print.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

bench_app = typer.Typer(help="Measure the engine or the whole agent (docs/benchmarks.md).", no_args_is_help=True)


@bench_app.command("engine")
def engine(
    backbone: Annotated[
        list[str] | None, typer.Option(help="open_clip or shipped model name; repeatable. Default genclip-tiny.")
    ] = None,
    image_size: Annotated[
        list[int] | None,
        typer.Option("--image-size", help="Model input size, pixels; repeatable. Default the backbone's native size."),
    ] = None,
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes; repeatable. Default 1 and 8.")] = None,
    mode: Annotated[str, typer.Option(help="dual-branch, query-only, or both.", case_sensitive=False)] = "dual-branch",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (towers; the head stays fp32).")] = "fp32",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="torch intra-op threads (0: torch's default).")] = 1,
    interop_threads: Annotated[
        int, typer.Option("--interop-threads", min=0, help="torch inter-op threads (0: torch's default).")
    ] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved rounds per point.")] = 5,
    frame: Annotated[str, typer.Option(help="Camera frame WxH fed to the engine.")] = "640x480",
    naive: Annotated[bool, typer.Option("--naive/--no-naive", help="Run the naive-loop baseline.")] = True,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the image path.")] = False,
    pipelined: Annotated[
        bool,
        typer.Option(
            "--pipelined",
            help="Also each batch size below the largest with batch k+1 launched before batch k's results are "
            "built, as the agent runs them (an overlap only a GPU can give).",
        ),
    ] = False,
    winclip: Annotated[
        bool,
        typer.Option(
            "--winclip", help="Also compare with anomalib's WinCLIP (ViT-B-16-plus-240, 240 px; extra 'bench')."
        ),
    ] = False,
    winclip_precision: Annotated[
        str | None, typer.Option("--winclip-precision", help="WinCLIP's precision; default the engine's.")
    ] = None,
    memory_shots: Annotated[
        int,
        typer.Option(
            "--memory-shots",
            min=0,
            help="Also the patch memory with K good frames: build time, size, search per frame, and fused vs "
            "zero-shot images/s at the largest batch, interleaved (0: skip).",
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    """Images/s, batch latency and memory per batch size, as ratios to the naive loop and to batch 1."""
    from bench.engine import print_engine_table, quiet_logs_to_stderr, run_bench
    from bench.winclip import winclip_available, winclip_point

    if winclip and not winclip_available():
        typer.echo("error: --winclip needs anomalib: pip install -e '.[bench]'", err=True)
        raise typer.Exit(2)

    quiet_logs_to_stderr()
    modes = bench_modes(mode)
    width, height = frame_size(frame)
    sizes: list[int | None] = [*image_size] if image_size else [None]
    report = run_bench(
        backbone or ["genclip-tiny"],
        sizes,
        modes,
        sorted(set(batch or [1, 8])),
        threads=threads,
        interop_threads=interop_threads,
        precision=precision,
        device=device,
        rounds=rounds,
        frame_size=(height, width),
        naive=naive,
        compile_model=compile_model,
        pipelined=pipelined,
        memory_shots=memory_shots,
    )
    if winclip:
        report["winclip"] = winclip_point(
            batch=max(batch or [8]),
            rounds=rounds,
            frame_size=(height, width),
            precision=precision,
            winclip_precision=winclip_precision,
        )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_engine_table(report)


def bench_modes(mode: str) -> list[str]:
    """--mode as the list of modes to run: dual-branch, query-only, or both of them."""
    modes = {"both": ["dual-branch", "query-only"]}.get(mode.lower(), [mode.lower()])
    for m in modes:
        if m not in ("dual-branch", "query-only"):
            raise typer.BadParameter(f"mode must be dual-branch, query-only or both, not {mode!r}")
    return modes


def frame_size(frame: str) -> tuple[int, int]:
    """--frame WxH as (width, height)."""
    try:
        width, height = (int(v) for v in frame.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"--frame must be WxH like 640x480, not {frame!r}") from None
    return width, height


@bench_app.command("agent")
def agent(
    cameras: Annotated[int, typer.Option(min=1, max=64, help="Synthetic cameras.")] = 4,
    fps: Annotated[float, typer.Option(min=0.1, max=240, help="Frames/s per camera.")] = 5.0,
    seconds: Annotated[float, typer.Option(min=1, help="Measured time, after the warm-up.")] = 60.0,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds before measuring (model load, warm-up).")] = 20.0,
    threads: Annotated[int, typer.Option(min=0, help="[engine].threads for the agent (0: its config).")] = 0,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="[engine].batch_size; default the config's.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="[model].device (auto, cpu, cuda, cuda:N); default the config's.")
    ] = None,
    backbone: Annotated[str | None, typer.Option(help="[model].backbone; default the config's.")] = None,
    precision: Annotated[
        str | None, typer.Option(help="[model].precision (fp32, bf16, fp16); default the config's.")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", min=16, help="[model].image_size; default the config's.")
    ] = None,
    compile_model: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="[model].compile; default the config's.")
    ] = None,
    defect_rate: Annotated[
        float, typer.Option("--defect-rate", min=0, max=1, help="Share of defective parts the cameras make, 0..1.")
    ] = 0.2,
    pipeline: Annotated[
        bool | None, typer.Option("--pipeline/--no-pipeline", help="[engine].pipeline; default the config's.")
    ] = None,
    brokers: Annotated[
        str, typer.Option(help="start: own Mosquitto and Redis on free ports; config: the config's brokers.")
    ] = "start",
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Base config (default: the repository's config.toml).")
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="Folder for the config, logs and brokers' files; default a new temporary folder."),
    ] = None,
    opcua: Annotated[
        bool | None,
        typer.Option(
            "--opcua/--no-opcua",
            help="Also run the OPC UA server and measure a monitoring client's capture-to-change latency "
            "(default: when the extra `opcua` is installed).",
        ),
    ] = None,
    page_rounds: Annotated[
        int,
        typer.Option(
            "--page-rounds",
            min=0,
            help="Compare the live page open (an MJPEG stream per camera and the events) and closed in this many "
            "interleaved rounds of --seconds per phase, on one agent (own brokers).",
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    """Sustained frames/s, capture-to-signal latency of MQTT results and rejects and OPC UA, drops by reason."""
    if brokers not in ("start", "config"):
        raise typer.BadParameter("--brokers must be start or config")
    from agent.opcua import PIP_INSTALL, available
    from bench.agent import print_agent_report, print_page_report, run_agent_bench, run_page_bench

    if opcua and not available():
        typer.echo(f"error: --opcua needs the OPC UA extra: {PIP_INSTALL}", err=True)
        raise typer.Exit(2)
    overrides = agent_overrides(batch_size, device, backbone, precision, pipeline, image_size, compile_model)
    if page_rounds:
        page = run_page_bench(
            cameras=cameras,
            fps=fps,
            rounds=page_rounds,
            seconds=seconds,
            warmup=warmup,
            threads=threads,
            base_config=config,
            overrides=overrides,
            work=work,
            progress=lambda text: typer.echo(text, err=True),
        )
        if as_json:
            typer.echo(json.dumps(page, indent=2))
        else:
            print_page_report(page)
        if not page["identity_holds"] or page["agent_exit_code"] != 0:
            raise typer.Exit(1)
        return
    report = run_agent_bench(
        opcua=available() if opcua is None else opcua,
        cameras=cameras,
        fps=fps,
        seconds=seconds,
        warmup=warmup,
        threads=threads,
        base_config=config,
        brokers=brokers,
        overrides=overrides,
        defect_rate=defect_rate,
        work=work,
        progress=lambda text: typer.echo(text, err=True),
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_agent_report(report)
    if not report["identity_holds"] or report["agent_exit_code"] != 0:
        raise typer.Exit(1)


def agent_overrides(
    batch_size: int | None,
    device: str | None,
    backbone: str | None,
    precision: str | None,
    pipeline: bool | None,
    image_size: int | None,
    compile_model: bool | None,
) -> dict[str, dict[str, Any]]:
    """The config sections `bench agent`'s flags replace in the base config (flags not given: none)."""
    overrides: dict[str, dict[str, Any]] = {}
    if batch_size:
        overrides.setdefault("engine", {})["batch_size"] = batch_size
    if device:
        overrides.setdefault("model", {})["device"] = device
    if backbone:
        overrides.setdefault("model", {})["backbone"] = backbone
    if precision:
        overrides.setdefault("model", {})["precision"] = precision
    if pipeline is not None:
        overrides.setdefault("engine", {})["pipeline"] = "on" if pipeline else "off"
    if image_size:
        overrides.setdefault("model", {})["image_size"] = image_size
    if compile_model is not None:
        overrides.setdefault("model", {})["compile"] = compile_model
    return overrides
