"""Soak: `genclip run` with synthetic cameras at full rate for a long time; does anything grow or slip?

Reports throughput, drops by reason, capture-to-result latency percentiles (measured by an MQTT
subscriber on every result), and the agent's resident memory and open file descriptors after
warm-up and at the end. Brokers must be up on the config's ports (`make services-up`).

    .venv/bin/python -m bench.soak --minutes 30 --cameras 4 --fps 8 --out soak.json

Exit 0 when the run ended cleanly, the accounting identity held, and memory and descriptors
grew less than --max-growth (5 %) between the end of warm-up and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.agent import identity_holds, process_sample, scrape, stop_agent, stopped_frames, write_config
from bench.brokers import free_port

REPO = Path(__file__).resolve().parents[1]
LINE = "soak"


class ResultListener:
    """Subscribes to every result; keeps capture-to-receive latencies (ms)."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.latencies: list[float] = []
        self.count = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "soak-listener", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/{LINE}/+/result", qos=0)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        captured = datetime.fromisoformat(json.loads(msg.payload)["captured_at"].replace("Z", "+00:00")).timestamp()
        with self._lock:
            self.count += 1
            self.latencies.append(1000 * (now - captured))

    def take(self) -> list[float]:
        with self._lock:
            taken, self.latencies = self.latencies, []
        return taken

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "config.toml", help="base config (brokers, model)")
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--warmup", type=float, default=60, help="seconds before the baseline sample")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--fps", type=float, default=8, help="per camera")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the agent (OMP_NUM_THREADS)")
    p.add_argument("--interval", type=float, default=30, help="seconds between samples")
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed growth of RSS and fds after warm-up")
    p.add_argument("--work", type=Path, default=REPO / ".run" / "soak")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    health = free_port()
    config = write_config(
        args.config,
        args.work,
        cameras=args.cameras,
        fps=args.fps,
        health_port=health,
        overrides={"mqtt": {"result_qos": 0}},
        line=LINE,
    )
    base = tomllib.loads(args.config.read_text())
    host, mport = base["mqtt"].get("host", "127.0.0.1"), int(base["mqtt"].get("port", 1883))
    listener = ResultListener(host, mport, base["mqtt"].get("topic_prefix", "genclip"))
    log_path = args.work / "agent.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    exe = str(Path(sys.executable).with_name("genclip"))
    started = time.monotonic()
    with log_path.open("w") as log:
        agent = subprocess.Popen([exe, "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    samples: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    end = started + 60 * args.minutes
    print(f"soak: {args.cameras} cameras x {args.fps} fps for {args.minutes} min; agent pid {agent.pid}", flush=True)
    try:
        while time.monotonic() < end and agent.poll() is None:
            time.sleep(min(args.interval, max(0.1, end - time.monotonic())))
            try:
                counters = scrape(health)
            except OSError:
                continue  # not listening yet
            lat = listener.take()
            sample: dict[str, Any] = {
                "t_s": round(time.monotonic() - started, 1),
                **process_sample(agent.pid),
                "results": listener.count,
                "processed": counters.get("genclip_frames_processed", 0),
                "captured": counters.get("genclip_frames_captured", 0),
                "dropped": {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("dropped.")},
                "latency_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat, default=float("nan"))},
            }
            samples.append(sample)
            if baseline is None and sample["t_s"] >= args.warmup:
                baseline = sample
            print(
                f"  t={sample['t_s']:>7.0f}s rss {sample['rss_mib']:.0f} MiB fds {sample['fds']} "
                f"threads {sample['threads']} results {sample['results']} dropped {sample['dropped']} "
                f"latency p50 {sample['latency_ms']['p50']:.0f} ms p99 {sample['latency_ms']['p99']:.0f} ms",
                flush=True,
            )
    finally:
        final = samples[-1] if samples else None
        stop_agent(agent)
        listener.stop()
    stopped = stopped_frames(log_path.read_text(errors="replace"))
    return report(args, samples, baseline, final, stopped, agent.returncode)


def report(
    args: argparse.Namespace,
    samples: list[dict[str, Any]],
    baseline: dict[str, Any] | None,
    final: dict[str, Any] | None,
    frames: dict[str, Any] | None,
    returncode: int | None,
) -> int:
    if not samples or baseline is None or final is None:
        print("soak: too few samples (did the agent start? see the log)")
        return 1
    span = final["t_s"] - baseline["t_s"]
    results = final["results"] - baseline["results"]
    all_lat = [s["latency_ms"] for s in samples if s["t_s"] > baseline["t_s"]]
    rss_growth = final["rss_mib"] / baseline["rss_mib"] - 1
    fd_growth = final["fds"] / baseline["fds"] - 1
    identity = identity_holds(frames)
    out = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "settings": {"minutes": args.minutes, "cameras": args.cameras, "fps": args.fps, "threads": args.threads},
        "offered_fps": args.cameras * args.fps,
        "results_per_s_after_warmup": round(results / span, 2) if span else None,
        "worst_sample_latency_ms": {
            "p50": max(x["p50"] for x in all_lat) if all_lat else None,
            "p99": max(x["p99"] for x in all_lat) if all_lat else None,
            "max": max(x["max"] for x in all_lat) if all_lat else None,
        },
        "median_sample_latency_ms": {
            "p50": pct([x["p50"] for x in all_lat], 50) if all_lat else None,
            "p99": pct([x["p99"] for x in all_lat], 50) if all_lat else None,
        },
        "rss_mib": {"after_warmup": round(baseline["rss_mib"], 1), "end": round(final["rss_mib"], 1)},
        "rss_growth": round(rss_growth, 4),
        "fds": {"after_warmup": baseline["fds"], "end": final["fds"]},
        "fd_growth": round(fd_growth, 4),
        "threads": {"after_warmup": baseline["threads"], "end": final["threads"]},
        "frames": frames,
        "identity_holds": identity,
        "agent_exit_code": returncode,
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    ok = returncode == 0 and identity and rss_growth < args.max_growth and fd_growth <= args.max_growth
    print(f"soak {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
