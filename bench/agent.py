"""`genclip bench agent`: the whole agent under load, measured from outside like a PLC would see it.

Starts its own Mosquitto and Redis on free loopback ports (or uses the config's with
`--brokers config`), runs `genclip run` with N synthetic cameras at F frames/s each,
and subscribes to every result and reject: sustained frames/s, capture-to-publish
latency (from the frame's `captured_at` to the subscriber's clock; same machine), and with
`opcua` the same for an OPC UA client monitoring each camera's `CapturedAt` (the server on,
handshake off: every result is presented as it comes),
drops by reason (the agent's /metrics), Redis stream entries, the agent's CPU and
memory, and at the end the accounting identity from the agent's own "stopped" line:
accepted = published + dropped + expired.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w
import typer

from bench.brokers import HOST, MosquittoServer, RedisServer, find_binary, free_port

REPO = Path(__file__).resolve().parents[1]
LINE = "bench"
TEXTURES = ("metal", "woven", "tiles", "leather", "grain", "dots")


def write_config(
    base: Path,
    work: Path,
    *,
    cameras: int,
    fps: float,
    health_port: int,
    mqtt_port: int | None = None,
    redis_url: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    defect_rate: float = 0.2,
    line: str = LINE,
) -> Path:
    """The line's config with `cameras` synthetic cameras at `fps`, JSON logs, and the given brokers."""
    config = tomllib.loads(base.read_text())
    config["line"] = {"id": line, "name": "Benchmark"}
    config["cameras"] = [
        {
            "id": f"cam-{i + 1}",
            "source": f"synthetic:{line}-{i + 1}",
            "product_class": f"class{i % 2}",
            "fps": fps,
            "synthetic": {"texture": TEXTURES[i % len(TEXTURES)], "seed": i, "defect_rate": defect_rate},
        }
        for i in range(cameras)
    ]
    config["references"] = {}
    config["thresholds"] = {}
    config["agent"].update(health_port=health_port)
    config["logging"] = {"level": "INFO", "format": "json"}
    if mqtt_port is not None:
        config["mqtt"].update(host=HOST, port=mqtt_port)
    if redis_url is not None:
        config["redis"]["url"] = redis_url
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    path = work / f"{line}.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def process_sample(pid: int) -> dict[str, float]:
    """Resident memory (MiB), open descriptors, threads and CPU seconds of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss_mib": rss_kib / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads, "cpu_s": cpu_s}


def scrape(port: int) -> dict[str, float]:
    """The agent's /metrics counters, summed over labels, plus `dropped.<reason>`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"(genclip_[a-z_]+?)(?:_total)?(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "genclip_frames_dropped":
            reason = re.search(r'reason="([^"]+)"', labels).group(1)  # type: ignore[union-attr]
            out[f"dropped.{reason}"] = out.get(f"dropped.{reason}", 0) + value
        out[name] = out.get(name, 0) + value
    return out


class LatencyListener:
    """Subscribes to every result and reject of the line; capture-to-receive latencies in ms."""

    def __init__(self, host: str, port: int, prefix: str, line: str = LINE) -> None:
        import paho.mqtt.client as mqtt

        self.latencies: dict[str, list[float]] = {"result": [], "reject": []}
        self.counts = {"result": 0, "reject": 0}
        self._lock = threading.Lock()
        self._measuring = False
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, f"{line}-bench-listener", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"{prefix}/{line}/+/result", 0), (f"{prefix}/{line}/+/reject", 1)]
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        kind = msg.topic.rsplit("/", 1)[1]
        try:
            captured = datetime.fromisoformat(json.loads(msg.payload)["captured_at"].replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            self.counts[kind] += 1
            if self._measuring:
                self.latencies[kind].append(1000 * (now - captured.timestamp()))

    def mark(self) -> dict[str, int]:
        """How many latencies of each kind are kept so far (slice `latencies` between two marks)."""
        with self._lock:
            return {kind: len(values) for kind, values in self.latencies.items()}

    def measure(self) -> dict[str, int]:
        """Start keeping latencies (after warm-up); returns the counts so far."""
        with self._lock:
            self._measuring = True
            return dict(self.counts)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stop_agent(agent: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM, as systemd stops it (the agent drains and logs "stopped"); SIGKILL after `timeout`."""
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(timeout)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 1)

    return {"p50": at(50), "p99": at(99), "max": round(ordered[-1], 1), "count": len(ordered)}


def stopped_frames(log_text: str) -> dict[str, Any] | None:
    """The ledger from the agent's last "stopped" log line."""
    found = None
    for line in log_text.splitlines():
        if '"stopped"' not in line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "stopped":
            found = record.get("frames")
    return found


def identity_holds(frames: dict[str, Any] | None) -> bool:
    return frames is not None and frames["accepted"] == (
        frames["published"] + sum(frames["dropped"].values()) + frames["expired"]
    )


def redis_entries(url: str, line: str = LINE) -> int:
    """Entries in the line's result streams (what a dashboard can read)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return sum(
            int(client.xlen(key)) for key in client.scan_iter(match=f"*{line}*") if client.type(key) == b"stream"
        )
    finally:
        client.close()


def run_agent_bench(
    *,
    opcua: bool = False,
    cameras: int = 4,
    fps: float = 5.0,
    seconds: float = 60.0,
    warmup: float = 20.0,
    threads: int = 0,
    base_config: Path | None = None,
    brokers: str = "start",
    overrides: dict[str, dict[str, Any]] | None = None,
    defect_rate: float = 0.2,
    work: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the agent under load and return the report (see the module docstring)."""
    from bench.engine import machine_info

    say = progress or (lambda text: None)
    work = Path(work or tempfile.mkdtemp(prefix="genclip-bench-agent-"))
    work.mkdir(parents=True, exist_ok=True)
    base = base_config or REPO / "config.toml"
    servers: list[Any] = []
    settings = {"engine": {"threads": threads}} if threads else {}
    for section, values in (overrides or {}).items():
        settings.setdefault(section, {}).update(values)
    try:
        if brokers == "start":
            mqtt_server = MosquittoServer(work / "mosquitto", executable=find_binary(MosquittoServer.binary))
            redis_server = RedisServer(work / "redis", executable=find_binary(RedisServer.binary))
            servers = [mqtt_server, redis_server]
            for server in servers:
                server.start()
            mqtt_host, mqtt_port, redis_url = HOST, mqtt_server.port, redis_server.url
        else:
            loaded = tomllib.loads(base.read_text())
            mqtt_host = loaded["mqtt"].get("host", HOST)
            mqtt_port = int(loaded["mqtt"].get("port", 1883))
            redis_url = loaded["redis"].get("url", "redis://127.0.0.1:6379/0")
        health = free_port()
        config = write_config(
            base,
            work,
            cameras=cameras,
            fps=fps,
            health_port=health,
            mqtt_port=mqtt_port if brokers == "start" else None,
            redis_url=redis_url if brokers == "start" else None,
            overrides=settings,
            defect_rate=defect_rate,
        )
        opcua_listener = None
        if opcua:  # the OPC UA path: a monitoring client's view of each result, next to MQTT's
            from bench.opcua_client import make_credentials

            credentials = make_credentials(work / "opcua", LINE)
            opcua_port = free_port()
            settings["opcua"] = credentials.config(opcua_port, handshake=False)
            config = write_config(
                base,
                work,
                cameras=cameras,
                fps=fps,
                health_port=health,
                mqtt_port=mqtt_port if brokers == "start" else None,
                redis_url=redis_url if brokers == "start" else None,
                overrides=settings,
                defect_rate=defect_rate,
            )
        written = tomllib.loads(config.read_text())
        prefix = written["mqtt"].get("topic_prefix", "genclip")
        listener = LatencyListener(mqtt_host, mqtt_port, prefix)
        log_path = work / "agent.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        exe = str(Path(sys.executable).with_name("genclip"))
        command = [exe, "run", "--config", str(config)] if Path(exe).exists() else [
            sys.executable, "-m", "cli", "run", "--config", str(config)
        ]  # fmt: skip
        started = time.monotonic()
        with log_path.open("w") as log:
            agent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        say(f"agent pid {agent.pid}: {cameras} camera(s) x {fps:g} fps; warm-up {warmup:g} s, then {seconds:g} s")
        first = last = None
        try:
            while agent.poll() is None and time.monotonic() - started < warmup:
                time.sleep(0.5)
            ready_by = time.monotonic() + 600  # a large model (and compiling it) may need more than the warm-up
            while agent.poll() is None and time.monotonic() < ready_by:
                with contextlib.suppress(OSError):
                    if scrape(health).get("genclip_frames_processed", 0) > 0:
                        break
                time.sleep(0.5)
            if opcua:
                from bench.opcua_client import OpcuaLatencyListener

                ids = [c["id"] for c in written["cameras"]]
                opcua_listener = OpcuaLatencyListener(f"opc.tcp://127.0.0.1:{opcua_port}/", credentials, LINE, ids)
                opcua_listener.start()
            try:
                first = {**scrape(health), **process_sample(agent.pid), "t": time.monotonic()}
            except OSError as exc:
                raise RuntimeError(
                    f"the agent is not answering on /metrics after warm-up ({exc}); see {log_path}"
                ) from None
            seen = listener.measure()
            opcua_seen = opcua_listener.measure() if opcua_listener is not None else 0
            end = time.monotonic() + seconds
            while agent.poll() is None and time.monotonic() < end:
                time.sleep(min(1.0, max(0.05, end - time.monotonic())))
            last = {**scrape(health), **process_sample(agent.pid), "t": time.monotonic()}
            counted = dict(listener.counts)
            opcua_counted = opcua_listener.count if opcua_listener is not None else 0
        finally:
            if opcua_listener is not None:  # before the agent: its server going away is not news
                opcua_listener.stop()
            stop_agent(agent)
            listener.stop()
        frames = stopped_frames(log_path.read_text(errors="replace"))
        span = last["t"] - first["t"]

        def rate(key: str) -> float:
            return round((last.get(key, 0) - first.get(key, 0)) / span, 2)

        dropped = {k.split(".", 1)[1]: int(last[k] - first.get(k, 0)) for k in last if k.startswith("dropped.")}
        report = {
            "machine": machine_info(),
            "settings": {
                "cameras": cameras,
                "fps_per_camera": fps,
                "seconds": seconds,
                "warmup_s": warmup,
                "threads": threads or "default",
                "brokers": brokers,
                "overrides": overrides or {},
                "backbone": written["model"]["backbone"],
                "precision": written["model"].get("precision", "fp32"),
                "pipeline": written["engine"].get("pipeline", "auto"),
                "image_size": written["model"].get("image_size"),
                "device": written["model"].get("device", "auto"),
            },
            "offered_fps": round(cameras * fps, 2),
            "captured_fps": rate("genclip_frames_captured"),
            "inspected_fps": rate("genclip_frames_processed"),
            "results_per_s": round((counted["result"] - seen["result"]) / span, 2),
            "rejects_per_s": round((counted["reject"] - seen["reject"]) / span, 2),
            "latency_ms": {
                **{k: percentiles(v) for k, v in listener.latencies.items()},
                **({"opcua": percentiles(opcua_listener.latencies)} if opcua_listener is not None else {}),
            },
            "opcua_results_per_s": round((opcua_counted - opcua_seen) / span, 2) if opcua else None,
            "dropped_during_measurement": {k: v for k, v in dropped.items() if v},
            "agent": {
                "cpu_percent": round(100 * (last["cpu_s"] - first["cpu_s"]) / span, 1),
                "rss_mib": round(last["rss_mib"], 1),
                "threads": int(last["threads"]),
            },
            "redis_stream_entries": redis_entries(redis_url) if brokers == "start" else None,
            "frames": frames,
            "identity_holds": identity_holds(frames),
            "agent_exit_code": agent.returncode,
            "log": str(log_path),
        }
        return report
    finally:
        for server in servers:
            server.stop()


def print_agent_report(r: dict[str, Any]) -> None:
    s = r["settings"]
    lines = [
        f"{s['cameras']} camera(s) x {s['fps_per_camera']:g} fps ({s['backbone']} {s.get('image_size')} px, "
        f"{s.get('precision', 'fp32')} on {s.get('device', 'auto')}, "
        f"threads {s['threads']}, pipeline {s.get('pipeline', 'auto')}), "
        f"{s['seconds']:g} s measured",
        f"frames/s: offered {r['offered_fps']}, captured {r['captured_fps']}, inspected {r['inspected_fps']}, "
        f"results {r['results_per_s']}, rejects {r['rejects_per_s']}",
    ]
    paths = {
        "result": "MQTT result",
        "reject": "MQTT reject",
        "opcua": "OPC UA CapturedAt change (monitoring client, 10 ms publishing)",
    }
    for kind, p in r["latency_ms"].items():
        if p["count"]:
            lines.append(
                f"capture->{paths.get(kind, kind)} latency: p50 {p['p50']} ms, p99 {p['p99']} ms, max {p['max']} ms "
                f"(n={p['count']})"
            )
    lines += [
        f"dropped while measured: {r['dropped_during_measurement'] or 'none'}",
        f"agent: {r['agent']['cpu_percent']} % CPU, {r['agent']['rss_mib']} MiB RSS, {r['agent']['threads']} threads; "
        f"redis stream entries {r['redis_stream_entries']}",
        f"accounting identity {'holds' if r['identity_holds'] else 'FAILS'}: {r['frames']}",
        f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, load {r['machine']['load_average'][0]:.2f}, "
        f"{r['machine']['date']}",
    ]
    for line in lines:
        typer.echo(line)


# --- the live page open vs closed (`genclip bench agent --page-rounds N`) -------------------------------------
class PageViewer:
    """What a browser with the live page open asks of the agent: one MJPEG stream per camera and the
    server-sent events, read as fast as they come (the rendering happens on the operator's PC, not here)."""

    def __init__(self, port: int, cameras: int) -> None:
        import http.client

        self.bytes = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        paths = [f"/stream/cam-{i + 1}.mjpg?overlay=40" for i in range(cameras)] + ["/api/events"]
        self._threads = []
        for path in paths:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"the live page answered {response.status} for {path}")
            thread = threading.Thread(target=self._read, args=(conn, response), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, conn: Any, response: Any) -> None:
        try:
            while not self._stop.is_set():
                try:
                    chunk = response.read1(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                with self._lock:
                    self.bytes += len(chunk)
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


def run_page_bench(
    *,
    cameras: int = 4,
    fps: float = 5.0,
    rounds: int = 3,
    seconds: float = 30.0,
    warmup: float = 20.0,
    threads: int = 0,
    base_config: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    work: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One agent, its live page closed and open in interleaved phases (closed, open, open, closed, ...: drift
    cancels out), `seconds` each: inspected frames/s and capture-to-result latency per phase, and the ratios
    open/closed with their spread over the rounds."""
    from bench.engine import machine_info

    say = progress or (lambda text: None)
    work = Path(work or tempfile.mkdtemp(prefix="genclip-bench-page-"))
    work.mkdir(parents=True, exist_ok=True)
    settings: dict[str, dict[str, Any]] = {"engine": {"threads": threads}} if threads else {}
    for section, values in (overrides or {}).items():
        settings.setdefault(section, {}).update(values)
    settings.setdefault("page", {}).update(enabled=True, anonymous_view=True)
    mqtt_server = MosquittoServer(work / "mosquitto", executable=find_binary(MosquittoServer.binary))
    redis_server = RedisServer(work / "redis", executable=find_binary(RedisServer.binary))
    servers = [mqtt_server, redis_server]
    for server in servers:
        server.start()
    try:
        health = free_port()
        config = write_config(
            base_config or REPO / "config.toml",
            work,
            cameras=cameras,
            fps=fps,
            health_port=health,
            mqtt_port=mqtt_server.port,
            redis_url=redis_server.url,
            overrides=settings,
        )
        written = tomllib.loads(config.read_text())
        listener = LatencyListener(HOST, mqtt_server.port, written["mqtt"].get("topic_prefix", "genclip"))
        log_path = work / "agent.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with log_path.open("w") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "cli", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        phases: list[dict[str, Any]] = []
        try:
            ready_by = time.monotonic() + max(warmup, 1.0) + 600
            while agent.poll() is None and time.monotonic() < ready_by:
                with contextlib.suppress(OSError):
                    if scrape(health).get("genclip_frames_processed", 0) > 0:
                        break
                time.sleep(0.5)
            time.sleep(warmup)
            listener.measure()
            order = [("closed", "open") if r % 2 == 0 else ("open", "closed") for r in range(rounds)]
            for round_index, pair in enumerate(order):
                for state in pair:
                    say(f"round {round_index + 1}/{rounds}: page {state} for {seconds:g} s")
                    phases.append({"round": round_index + 1, **_page_phase(state, health, cameras, seconds, listener)})
        finally:
            stop_agent(agent)
            listener.stop()
        return {
            "machine": machine_info(),
            "settings": {
                "cameras": cameras,
                "fps_per_camera": fps,
                "rounds": rounds,
                "seconds_per_phase": seconds,
                "warmup_s": warmup,
                "threads": threads or "default",
                "backbone": written["model"]["backbone"],
                "page": written["page"],
            },
            "phases": phases,
            "comparison": compare_page_phases(phases),
            "identity_holds": identity_holds(stopped_frames(log_path.read_text(errors="replace"))),
            "agent_exit_code": agent.returncode,
            "log": str(log_path),
        }
    finally:
        for server in servers:
            server.stop()


def _page_phase(state: str, port: int, cameras: int, seconds: float, listener: LatencyListener) -> dict[str, Any]:
    """One phase with the page open (a viewer on every camera and the events) or closed."""
    viewer = PageViewer(port, cameras) if state == "open" else None
    try:
        first, mark = {**scrape(port), "t": time.monotonic()}, listener.mark()
        time.sleep(seconds)
        last, end = {**scrape(port), "t": time.monotonic()}, listener.mark()
    finally:
        if viewer is not None:
            viewer.close()
    span = last["t"] - first["t"]
    with listener._lock:
        latencies = listener.latencies["result"][mark["result"] : end["result"]]
    return {
        "page": state,
        "inspected_fps": round((last["genclip_frames_processed"] - first["genclip_frames_processed"]) / span, 3),
        "latency_ms": percentiles(latencies),
        "frames_encoded": int(last.get("genclip_page_frames_encoded", 0) - first.get("genclip_page_frames_encoded", 0)),
        "viewer_mib": round(viewer.bytes / 2**20, 2) if viewer is not None else 0.0,
    }


def compare_page_phases(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round: open/closed of inspected frames/s and of the result latency's p99; their mean, min and max."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for phase in phases:
        by_round.setdefault(phase["round"], {})[phase["page"]] = phase
    throughput, p99 = [], []
    for pair in by_round.values():
        if {"open", "closed"} <= set(pair):
            throughput.append(pair["open"]["inspected_fps"] / pair["closed"]["inspected_fps"])
            open_p99, closed_p99 = pair["open"]["latency_ms"]["p99"], pair["closed"]["latency_ms"]["p99"]
            if open_p99 is not None and closed_p99:
                p99.append(open_p99 / closed_p99)

    def spread(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"mean": None, "min": None, "max": None}
        return {"mean": round(sum(values) / len(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}

    return {"throughput_open_over_closed": spread(throughput), "p99_open_over_closed": spread(p99)}


def print_page_report(r: dict[str, Any]) -> None:
    s = r["settings"]
    typer.echo(
        f"{s['cameras']} camera(s) x {s['fps_per_camera']:g} fps ({s['backbone']}, threads {s['threads']}), "
        f"{s['rounds']} rounds of page closed/open, {s['seconds_per_phase']:g} s each"
    )
    for p in r["phases"]:
        lat = p["latency_ms"]
        typer.echo(
            f"round {p['round']} page {p['page']:<6}: inspected {p['inspected_fps']:.2f} frames/s, result latency "
            f"p50 {lat['p50']} ms p99 {lat['p99']} ms (n={lat['count']}), JPEGs encoded {p['frames_encoded']}, "
            f"viewer read {p['viewer_mib']} MiB"
        )
    c = r["comparison"]
    for name, key in (("throughput", "throughput_open_over_closed"), ("p99 latency", "p99_open_over_closed")):
        v = c[key]
        typer.echo(f"{name} open/closed: mean {v['mean']}, min {v['min']}, max {v['max']}")
    m = r["machine"]
    typer.echo(f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_average'][0]:.2f}, {m['date']}")
