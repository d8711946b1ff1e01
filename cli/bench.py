"""`genclip bench`: speed figures a user can reproduce (docs/benchmarks.md).

    genclip bench engine --backbone genclip-tiny --backbone ViT-B-16 --threads 1 --rounds 5
    genclip bench engine --backbone ViT-B-16 --image-size 512 --batch 1 --batch 8 --json > b16-512.json
    genclip bench agent --cameras 4 --fps 5 --seconds 60

Figures go to stdout (a table, or one JSON document with --json); logs go to stderr.
Nothing is asserted: speed is reported, never tested against a clock.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

bench_app = typer.Typer(help="Measure the engine or the whole agent (docs/benchmarks.md).", no_args_is_help=True)


def _quiet_logs_to_stderr() -> None:
    from agent.logs import configure_logging

    configure_logging("bench", "WARNING", "console", stream=sys.stderr)


def register(app: typer.Typer, load_config: Callable[[Path | None], Any]) -> None:
    """Mount `genclip bench` on the root CLI."""

    @bench_app.command("engine")
    def engine(
        backbone: Annotated[
            list[str] | None, typer.Option(help="open_clip or shipped model name; repeatable. Default genclip-tiny.")
        ] = None,
        image_size: Annotated[
            list[int] | None,
            typer.Option(
                "--image-size", help="Model input size, pixels; repeatable. Default the backbone's native size."
            ),
        ] = None,
        batch: Annotated[list[int] | None, typer.Option(help="Batch sizes; repeatable. Default 1 and 8.")] = None,
        mode: Annotated[
            str, typer.Option(help="dual-branch, query-only, or both.", case_sensitive=False)
        ] = "dual-branch",
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
        as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    ) -> None:
        """Images/s, batch latency and memory per batch size, as ratios to the naive loop and to batch 1."""
        from bench.engine import run_bench
        from bench.winclip import winclip_available, winclip_point

        if winclip and not winclip_available():
            typer.echo("error: --winclip needs anomalib: pip install -e '.[bench]'", err=True)
            raise typer.Exit(2)

        _quiet_logs_to_stderr()
        modes = {"both": ["dual-branch", "query-only"]}.get(mode.lower(), [mode.lower()])
        for m in modes:
            if m not in ("dual-branch", "query-only"):
                raise typer.BadParameter(f"mode must be dual-branch, query-only or both, not {mode!r}")
        try:
            width, height = (int(v) for v in frame.lower().split("x"))
        except ValueError:
            raise typer.BadParameter(f"--frame must be WxH like 640x480, not {frame!r}") from None
        report = run_bench(
            backbone or ["genclip-tiny"],
            list(image_size or [None]),
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

    from bench import agent as agent_bench

    agent_bench.register(bench_app, load_config)
    app.add_typer(bench_app, name="bench")


def _spread(ratio: dict[str, float] | None) -> str:
    if not ratio:
        return "-"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def print_engine_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="genclip bench engine (ratios: median of per-round ratios, min-max)")
    columns = ("backbone", "size", "mode", "prec", "batch", "img/s", "p50 ms", "p99 ms", "vs naive", "vs b1", "vs fp32")
    for column in columns:
        table.add_column(column, justify="right" if column not in ("backbone", "mode") else "left")
    for p in report["points"]:
        if "naive" in p:
            table.add_row(
                p["backbone"], str(p["image_size"]), p["mode"], "fp32", "naive", f"{p['naive']['images_per_s']:.1f}"
            )
        if "fp32" in p:
            table.add_row(
                p["backbone"],
                str(p["image_size"]),
                p["mode"],
                "fp32",
                str(p["fp32"]["batch"]),
                f"{p['fp32']['images_per_s']:.1f}",
            )
        for v in p["engine"]:
            table.add_row(
                p["backbone"],
                str(p["image_size"]),
                p["mode"],
                p["precision"],
                f"{v['batch']} pipelined" if v.get("pipelined") else str(v["batch"]),
                f"{v['images_per_s']:.1f}",
                "" if v["batch_ms_p50"] is None else f"{v['batch_ms_p50']:.1f}",
                "" if v["batch_ms_p99"] is None else f"{v['batch_ms_p99']:.1f}",
                _spread(v.get("vs_naive")),
                _spread(v.get("vs_batch_1")),
                _spread(v.get("vs_fp32")),
            )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for p in report["points"]:
        eq = (p.get("naive") or {}).get("equality")
        console.print(
            f"{p['backbone']} {p['image_size']}px {p['mode']}: first batch of a new class "
            f"{p['new_class_first_batch_ms']['median']:.1f} ms; peak RSS {p['peak_rss_mib']} MiB"
            + (f"; device max {p['device_max_allocated_mib']} MiB" if p["device_max_allocated_mib"] else "")
            + (
                f"; naive = engine within {eq['max_score_diff']:.1e} (score), {eq['max_map_diff']:.1e} (map), "
                f"regions {'equal' if eq['same_regions'] else 'DIFFER'} ({eq['anomalous_frames']} NG frames)"
                if eq
                else ""
            )
        )
        agree = (p.get("fp32") or {}).get("agreement")
        if agree:
            console.print(
                f"  {p['precision']} vs fp32 on the same frames: scores within {agree['max_score_diff']:.1e}, maps "
                f"within {agree['max_map_diff']:.1e} (correlation >= {agree['min_map_correlation']:.4f}), "
                f"{agree['same_verdicts']}/{agree['frames']} verdicts equal"
            )
    if "winclip" in report:
        w = report["winclip"]
        console.print(
            f"WinCLIP (anomalib) on {w['backbone']} at {w['image_size']} px, engine {w['precision']}, WinCLIP "
            f"{w['winclip_precision']}, batch {w['batch']}: engine "
            f"{w['images_per_s']['engine']} img/s, WinCLIP {w['images_per_s']['winclip batch']} img/s batched, "
            f"{w['images_per_s']['winclip one by one']} img/s one by one; engine is "
            f"{_spread(w['engine_vs_winclip_batch'])} / {_spread(w['engine_vs_winclip_one_by_one'])} faster"
        )
    m = report["machine"]
    console.print(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads, "
        f"{m['interop_threads']} inter-op), gpu {m['gpu'] or 'none'}, load {m['load_average'][0]:.2f}, {m['date']}"
    )
