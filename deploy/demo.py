"""The whole loop on one machine, as `make demo` runs it.

Two synthetic cameras (two product classes, parts with known injected defects) are triggered
over MQTT by the PLC stand-in of synthetic/plc.py: a conveyor per camera triggers one part per
tick with the PLC's own part id, and the PLC's reject station, `[mqtt].decision_window_ms`
downstream, rejects a part on NG, ERROR or silence. `genclip run` answers every trigger; a
stand-in dashboard reads the Redis stream. Midway, `genclip train` learns prompts on synthetic
defects and publishes them into the folder the agent watches: the agent reloads them without a
restart. At the end the station's outcomes are checked against the cameras' ground truth.

The demo model (`genclip-tiny`) has random weights: the figures show that the loop works and
that prompts learn, not how well GenCLIP inspects. Real CLIP weights: docs/deploy.md.

    python deploy/demo.py [--before 30] [--after 60] [--epochs 6] [--rate 2] [--work .run/demo]

Exit 0 when every check in the summary passed. Brokers must be up (`make services-up`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import paho.mqtt.client as mqtt
import redis
import tomli_w

from synthetic.plc import Conveyor, Plc, PlcConfig, PlcReport, Rule

REPO = Path(__file__).resolve().parents[1]
LINE = "demo"


@dataclass(frozen=True)
class DemoCamera:
    """One synthetic camera of the demo line and the conveyor the PLC triggers it from."""

    product: str
    texture: str
    seed: int
    id_prefix: str  # the PLC's part ids: W-000001, W-000002, ... (unique over the whole run)
    withhold_every: int = 0  # every n-th trigger gets no frame: a missed trigger, answered ERROR


CLASSES = {
    "cam-1": DemoCamera("widget", "metal", 1, "W-"),
    "cam-2": DemoCamera("tile", "tiles", 2, "T-", withhold_every=20),
}
RECALL_FLOOR = 0.3
"""Share of defective parts rejected after the reload that the demo requires (see the summary)."""
RATE = 2.0
"""Parts per second each conveyor triggers: what the agent answers within 2 s on 2 cores while training runs
(at 4 per camera its queues back up and the late answers leave parts to the silence rule)."""
MAX_RUN_S = 3600  # a conveyor stops by itself after this long (the demo stops it long before)
ANSWER_WAIT_S = 20.0  # after the conveyors stop: how long the last parts may wait for their answers
SETTLE_WAIT_S = 3.0  # then how long the station waits for parts still on the belt before running it out
DEFECT_RATE = 0.3
REFERENCES = 40  # good parts per class for calibration
TRAIN_GOODS = 60  # good parts per class that training data is synthesised from
KINDS = ("hole", "stain", "missing part")
"""Defects the cameras inject and training synthesises: ones a random-weight backbone can learn to see."""
INSPECTING = ("online", "degraded")  # the agent's status words while it answers triggers


def genclip() -> str:
    """The `genclip` command of the interpreter running this script (the project's venv)."""
    local = Path(sys.executable).with_name("genclip")
    return str(local) if local.exists() else "genclip"


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --------------------------------------------------------------------------- setup


def good_parts(camera: dict[str, Any], first: int, count: int, out: Path) -> Path:
    """Good parts as the camera sees them (its surfaces, crops and flips), numbered after its stream."""
    from agent.sources import CameraConfig
    from agent.sources.synthetic import SyntheticSource

    cam = CameraConfig(**{**camera, "synthetic": {**camera["synthetic"], "defect_rate": 0.0, "ground_truth": None}})
    source = SyntheticSource(cam, lambda frame: None)
    source._render_backgrounds()
    out.mkdir(parents=True, exist_ok=True)
    for seq in range(first, first + count):
        cv2.imwrite(str(out / f"{seq}.png"), source.part(seq)[0])
    return out


def make_data(work: Path, cameras: list[dict[str, Any]], count: int) -> tuple[Path, dict[str, str]]:
    """Per class: good parts for calibration, and training data made from other good parts + synthetic defects.

    As on a real line: a few hundred good parts are collected from the line's cameras; no defective
    part is needed. References and training images are disjoint, so the threshold is not set on
    images the prompts were trained on.
    """
    data, references = work / "data", {}
    for camera in cameras:
        product = camera["product_class"]
        say(f"collecting good '{product}' parts; synthesising {count} training images from them")
        references[product] = str(good_parts(camera, 1_000_000, REFERENCES, work / "good" / product / "reference"))
        train_goods = good_parts(camera, 2_000_000, TRAIN_GOODS, work / "good" / product / "train")
        synth = [genclip(), "synth", "--source", str(train_goods), "--out", str(data), "--class", product]
        subprocess.run(
            [*synth, "--count", str(count), "--seed", "1", "--kinds", ",".join(KINDS)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return data, references


def cameras(work: Path) -> list[dict[str, Any]]:
    return [
        {
            "id": cam,
            "source": f"synthetic:{c.product}",
            "product_class": c.product,
            "acquisition": "triggered",
            "trigger": "mqtt",
            "synthetic": {
                "texture": c.texture,
                "seed": c.seed,
                "defect_rate": DEFECT_RATE,
                "kinds": list(KINDS),
                "ground_truth": str(work / f"{cam}-truth.jsonl"),
                "withhold_every": c.withhold_every,
            },
        }
        for cam, c in CLASSES.items()
    ]


def write_config(base: Path, work: Path, references: dict[str, str], quantile: float, window_ms: int) -> Path:
    """The demo line's config: the shipped config.toml with two synthetic cameras and references."""
    config = tomllib.loads(base.read_text())
    config["line"] = {"id": LINE, "name": "Demo line (synthetic cameras, random-weight model)"}
    config["model"].update(profile_dir=str(work / "profiles"), calibration_quantile=quantile)
    config["cameras"] = cameras(work)
    config["references"] = references
    config["mqtt"]["decision_window_ms"] = window_ms
    config["thresholds"] = {}
    config["agent"].update(prompt_dir=str(work / "prompts"), health_port=0)
    config["trainer"].update(out_dir=str(work / "runs"))
    config["logging"] = {"level": "INFO", "format": "json"}
    path = work / "demo.toml"
    path.write_text(tomli_w.dumps(config))
    return path


# --------------------------------------------------------------------------- stand-ins


@dataclass
class LineMonitor:
    """What the demo watches on MQTT besides the PLC stand-in (QoS 1): the agent's info (the prompt version) and
    status, and every decision and reject as it arrives, in time or not (the PLC keeps those that decide a part)."""

    host: str
    port: int
    prefix: str
    rejects: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (camera, part id): decisions received
    infos: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    since: float = field(default_factory=time.time)

    def start(self) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "demo-monitor", protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(self.host, self.port)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        base = f"{self.prefix}/{LINE}"
        client.subscribe(
            [(f"{base}/+/reject", 1), (f"{base}/+/decision", 1), (f"{base}/status", 1), (f"{base}/info", 1)]
        )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if not msg.payload:
            return
        if msg.topic.endswith("/reject"):
            self.rejects.append((now, json.loads(msg.payload)))
        elif msg.topic.endswith("/decision"):
            self.decisions[(msg.topic.split("/")[-2], json.loads(msg.payload)["part_id"])] += 1
        elif msg.topic.endswith("/info"):
            info = json.loads(msg.payload)
            if parse_time(info["started_at"]) >= self.since:  # not a retained one from an earlier run
                self.infos.append(info)
        elif msg.topic.endswith("/status"):
            self.statuses.append(msg.payload.decode())

    def prompt_version(self) -> str | None:
        return self.infos[-1]["model"]["prompt_version"] if self.infos else None

    def inspecting(self) -> bool:
        """The agent takes triggers: this run's info came and the status says it inspects."""
        return self.prompt_version() is not None and bool(self.statuses) and self.statuses[-1] in INSPECTING

    def clear_retained(self) -> None:
        """Forget a previous demo run's retained status and info."""
        for topic in ("status", "info"):
            self.client.publish(f"{self.prefix}/{LINE}/{topic}", b"", qos=1, retain=True).wait_for_publish(5)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Dashboard(threading.Thread):
    """Stand-in dashboard: reads the line's Redis stream as it grows."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        super().__init__(daemon=True)
        self.client, self.stream = client, stream
        self.results: dict[str, dict[str, Any]] = {}
        self.entries = 0
        self._done = threading.Event()

    def run(self) -> None:
        last: str | bytes = "0-0"
        while not self._done.is_set():
            try:
                reply: Any = self.client.xread({self.stream: last}, block=500, count=500)
            except redis.RedisError:
                time.sleep(0.5)
                continue
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    self.entries += 1
                    result = json.loads(fields[b"payload"])
                    self.results[result["part_id"]] = result

    def stop(self) -> None:
        self._done.set()
        self.join(5)


# --------------------------------------------------------------------------- summary


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def read_truth(work: Path) -> dict[str, dict[str, Any]]:
    truth = {}
    for cam in CLASSES:
        path = work / f"{cam}-truth.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                truth[record["part_id"]] = record
    return truth


def expired_rejects(log: Path) -> set[str]:
    """Parts whose reject the agent withheld because the PLC's deadline had passed (it logs each)."""
    parts = set()
    for line in log.read_text(errors="replace").splitlines():
        if "expired before it could be sent" in line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "reject":
                parts.add(record.get("part"))
    return parts


def stopped_event(log: Path) -> dict[str, Any] | None:
    """The agent's last `stopped` log record: the frame accounting after a clean stop."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        if '"stopped"' in line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "stopped":
                found = record
    return found


def phase_table(
    truth: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]], rejected: set[str]
) -> list[dict[str, Any]]:
    """Precision and recall of the rejects per prompt version, in the order the versions ran.

    Parts a camera withheld (missed triggers) were inspected by no prompts: they are left out.
    """
    phases: dict[str, Counter] = {}
    kinds: dict[str, Counter] = {}
    for part_id, result in results.items():
        gt = truth.get(part_id)
        if gt is None or gt.get("withheld"):
            continue
        version = result["model"]["prompt_version"]
        c = phases.setdefault(version, Counter())
        k = kinds.setdefault(version, Counter())
        hit = part_id in rejected
        c["parts"] += 1
        c["defective"] += gt["defective"]
        c["rejected"] += hit
        c["tp"] += hit and gt["defective"]
        if gt["defective"]:
            k[(gt["type"], "n")] += 1
            k[(gt["type"], "hit")] += hit
    rows = []
    for version, c in phases.items():
        rows.append(
            {
                "version": version,
                **c,
                "precision": c["tp"] / c["rejected"] if c["rejected"] else 0.0,
                "recall": c["tp"] / c["defective"] if c["defective"] else 0.0,
                "by_kind": {
                    kind: (kinds[version][(kind, "hit")], n)
                    for (kind, what), n in kinds[version].items()
                    if what == "n"
                },
            }
        )
    return rows


def decision_checks(report: PlcReport, monitor: LineMonitor, truth: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """The PLC's view: one decision per triggered part, no uninspected part passed, missed triggers rejected."""
    decided = [(monitor.decisions[(r.camera, r.part_id)], r.rule) for r in report.records]
    once = report.parts == report.triggers and all(n == 1 or (n == 0 and rule is Rule.SILENCE) for n, rule in decided)
    withheld = [pid for pid, t in truth.items() if t.get("withheld")]
    rules = {r.part_id: r.rule for r in report.records}
    missed_ok = sum(rules.get(pid) is Rule.ERROR for pid in withheld)
    return {
        "every triggered part got exactly one decision or was rejected by silence": once,
        "no uninspected (ERROR or silent) part passed": report.uninspected_passed == 0,
        f"missed triggers answered ERROR ({missed_ok} of {len(withheld)} withheld parts rejected by rule ERROR)": (
            bool(withheld) and missed_ok == len(withheld)
        ),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "config.toml", help="base config (brokers, model)")
    parser.add_argument("--work", type=Path, default=REPO / ".run" / "demo", help="scratch folder (emptied)")
    parser.add_argument("--before", type=float, default=30, help="seconds on untrained prompts before training")
    parser.add_argument("--after", type=float, default=60, help="seconds on the new prompts after the reload")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--images", type=int, default=120, help="training images per class")
    parser.add_argument("--quantile", type=float, default=0.95, help="calibration quantile of the good parts")
    parser.add_argument("--recall-floor", type=float, default=RECALL_FLOOR)
    parser.add_argument("--rate", type=float, default=RATE, help="parts per second the PLC triggers per camera")
    parser.add_argument(
        "--decision-window-ms",
        type=int,
        help="how long the PLC waits (its reject station's delay); default [mqtt].decision_window_ms (2000)",
    )
    args = parser.parse_args(argv)

    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "prompts").mkdir(parents=True)
    base = tomllib.loads(args.config.read_text())
    mq, prefix = base.get("mqtt", {}), base.get("mqtt", {}).get("topic_prefix", "genclip")
    host, port = mq.get("host", "127.0.0.1"), int(mq.get("port", 1883))
    redis_url = base.get("redis", {}).get("url", "redis://127.0.0.1:6379/0")
    window_ms = args.decision_window_ms or int(mq.get("decision_window_ms", 2000))

    say("GenCLIP Inspect demo: the model is genclip-tiny with RANDOM weights (no pretrained CLIP can be")
    say("downloaded here). Scores show the loop works and prompts learn; for real inspection put CLIP")
    say("weights in [model].pretrained (see docs/deploy.md, 'Pretrained CLIP weights').")
    try:
        store = redis.Redis.from_url(redis_url)
        store.ping()
        monitor = LineMonitor(host, port, prefix)
        monitor.start()
        plc = Plc(PlcConfig(host=host, port=port, topic_prefix=prefix, line=LINE, reject_delay_s=window_ms / 1000))
        plc.start()
    except (OSError, redis.RedisError) as exc:
        say(f"cannot reach the brokers ({exc}); start them with: make services-up")
        return 1
    stream = f"genclip:{LINE}:results"
    for key in store.scan_iter(f"genclip:{LINE}:*"):
        store.delete(key)
    monitor.clear_retained()

    data, references = make_data(work, cameras(work), args.images)
    config = write_config(args.config, work, references, args.quantile, window_ms)
    say(f"config: {config}  (genclip config show --config {config})")
    dashboard = Dashboard(redis.Redis.from_url(redis_url), stream)
    dashboard.start()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    agent_log = (work / "agent.log").open("w")
    say("starting the agent: genclip run --config " + str(config))
    agent = subprocess.Popen(
        [genclip(), "run", "--config", str(config)], stdout=agent_log, stderr=subprocess.STDOUT, env=env
    )
    line = Line(plc, monitor, dashboard)
    checks: dict[str, bool] = {}
    train_proc: subprocess.Popen | None = None
    first_version: str | None = None
    try:
        deadline = time.monotonic() + 180
        while not monitor.inspecting() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        first_version = monitor.prompt_version()
        if first_version is None or not monitor.inspecting():
            say(f"the agent did not come up; its log: {work / 'agent.log'}")
            return 1
        say(f"agent online, prompts '{first_version}'. Watch it live in another terminal:")
        print(
            f"    mosquitto_sub -h {host} -p {port} -V mqttv5 -v -t '{prefix}/{LINE}/+/trigger'"
            f" -t '{prefix}/{LINE}/+/reject' -t '{prefix}/{LINE}/status'"
        )
        print(f"    redis-cli -u {redis_url} XREVRANGE {stream} + - COUNT 3")
        line.start_conveyors(args.rate)
        say(f"the PLC triggers {args.rate:g} parts/s per camera; its reject station is {window_ms} ms downstream")
        line.progress(args.before)

        say(f"training prompts on synthetic defects ({args.epochs} epochs), publishing into {work / 'prompts'}")
        train_log = (work / "train.log").open("w")
        train_cmd = [genclip(), "train", "--config", str(config), "--data", f"synthetic:{data}@all"]
        train_cmd += ["--out", str(work / "runs" / "demo"), "--epochs", str(args.epochs), "--workers", "0"]
        train_cmd += ["--publish", str(work / "prompts"), "--no-progress"]
        # One thread for training leaves the other core to the line.
        train_proc = subprocess.Popen(
            train_cmd, stdout=train_log, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}
        )
        proc = train_proc
        while proc.poll() is None:
            line.progress(15, until=lambda: proc.poll() is not None)
        checks["training finished"] = train_proc.returncode == 0
        if train_proc.returncode != 0:
            say(f"training failed; its log: {work / 'train.log'}")
        else:
            deadline = time.monotonic() + 180  # validation and recalibration on a busy machine
            while monitor.prompt_version() == first_version and time.monotonic() < deadline:
                time.sleep(0.2)
            checks["prompts hot-reloaded (no restart)"] = monitor.prompt_version() != first_version
            say(f"prompts reloaded: '{first_version}' -> '{monitor.prompt_version()}'")
            line.progress(args.after)
    finally:
        if train_proc is not None and train_proc.poll() is None:
            train_proc.terminate()
        line.stop_conveyors()
        say("stopping the agent (SIGTERM)")
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        time.sleep(1.0)  # the last answers and stream entries in flight to the stand-ins
        run_out = line.settle(window_ms / 1000)
        dashboard.stop()
        monitor.stop()
        plc.stop()
    checks["agent stopped cleanly"] = agent.returncode == 0
    summary = Summary(work, line, run_out, window_ms, args.recall_floor, (host, port, prefix, redis_url))
    return summary.print(first_version or "", checks)


@dataclass
class Line:
    """The demo line while it runs: the PLC stand-in and its conveyors, the MQTT monitor, the dashboard."""

    plc: Plc
    monitor: LineMonitor
    dashboard: Dashboard
    conveyors: list[Conveyor] = field(default_factory=list)

    def start_conveyors(self, rate: float) -> None:
        """A conveyor per camera: `rate` parts a second, part ids unique over the run (W-000001, T-000001, ...)."""
        for cam, c in CLASSES.items():
            conveyor = self.plc.conveyor(cam, rate, int(rate * MAX_RUN_S), id_prefix=c.id_prefix)
            self.conveyors.append(conveyor.start())

    def triggered(self) -> int:
        return sum(len(c.trigger_times) for c in self.conveyors)

    def progress(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not until():
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        say(
            f"{self.triggered()} parts triggered, {len(self.monitor.decisions)} decided, "
            f"{len(self.monitor.rejects)} rejects, {self.dashboard.entries} results on the stream, "
            f"prompts '{self.monitor.prompt_version()}'"
        )

    def stop_conveyors(self) -> None:
        """The PLC stops the belt; the agent gets a while to answer the last parts triggered."""
        for conveyor in self.conveyors:
            conveyor.stop()
        say(f"conveyors stopped after {self.triggered()} parts; waiting for the last answers")
        deadline = time.monotonic() + ANSWER_WAIT_S
        while len(self.monitor.decisions) < self.triggered() and time.monotonic() < deadline:
            time.sleep(0.2)

    def settle(self, delay_s: float) -> int:
        """Let the reject station take the parts still on the belt; the number run out without waiting.

        Called after the agent stopped, when no answer can come any more: the parts due soon are waited
        for, the rest are decided at once on what arrived, as the station would at their time.
        """
        if self.plc.wait_settled(min(delay_s, SETTLE_WAIT_S)):
            return 0
        return len(self.plc.run_out())


@dataclass
class Summary:
    """The demo's closing report: the agent's figures, the PLC's view, precision/recall per prompt version, checks."""

    work: Path
    line: Line
    run_out: int  # parts the station decided at the end without waiting out their delay
    window_ms: int
    floor: float
    where: tuple[str, int, str, str]

    def print(self, first_version: str, checks: dict[str, bool]) -> int:
        truth = read_truth(self.work)
        report = self.line.plc.report({pid: bool(t["defective"]) for pid, t in truth.items()})
        stopped = stopped_event(self.work / "agent.log") or {}
        print()
        print("=" * 78)
        print("GenCLIP Inspect demo: summary (model: genclip-tiny, RANDOM weights)")
        print("=" * 78)
        self.agent_view(truth, stopped.get("frames", {}))
        print()
        self.plc_view(report)
        print()
        rows = self.phases(truth)
        checks.update(self.agent_checks(stopped.get("frames", {}), int(stopped.get("answered", 0))))
        checks.update(decision_checks(report, self.line.monitor, truth))
        after = [r for r in rows if r["version"] != first_version]
        if after:
            recall = after[-1]["recall"]
            checks[f"recall after the reload >= {self.floor:.2f} (got {recall:.2f})"] = recall >= self.floor
        for name, ok in checks.items():
            print(f"  [{'ok' if ok else 'FAILED'}] {name}")
        self.footer()
        ok = all(checks.values())
        print(f"demo {'passed' if ok else 'FAILED'}")
        return 0 if ok else 1

    def agent_view(self, truth: dict[str, dict[str, Any]], frames: dict[str, Any]) -> None:
        monitor, dashboard = self.line.monitor, self.line.dashboard
        rejected = {payload["part_id"] for _, payload in monitor.rejects}
        withheld = sum(bool(t.get("withheld")) for t in truth.values())
        defective = sum(t["defective"] for t in truth.values())
        print(f"parts the cameras saw         {len(truth)}  ({defective} with a defect, {withheld} withheld)")
        print(f"results on the Redis stream   {dashboard.entries}  ({len(dashboard.results)} parts)")
        print(
            f"rejects on MQTT               {len(monitor.rejects)}  ({len(rejected)} parts, "
            f"{len(monitor.rejects) - len(rejected)} duplicate deliveries)"
        )
        print(f"rejects withheld (late)       {len(expired_rejects(self.work / 'agent.log'))}  (past the deadline)")
        latencies = [1000 * (t - parse_time(p["captured_at"])) for t, p in monitor.rejects]
        if latencies:
            print(
                f"capture -> reject latency     p50 {percentile(latencies, 50):.0f} ms, "
                f"p99 {percentile(latencies, 99):.0f} ms, "
                f"max {max(latencies):.0f} ms (mean {statistics.fmean(latencies):.0f} ms)"
            )
        if frames:
            dropped = frames.get("dropped", {})
            print(
                f"frames                        accepted {frames['accepted']} = published {frames['published']} + "
                f"dropped {sum(dropped.values())} {dropped or ''} + expired {frames['expired']} + "
                f"in flight {frames['in_flight']}"
            )

    def plc_view(self, report: PlcReport) -> None:
        decisions = self.line.monitor.decisions
        print(f"PLC stand-in (synthetic/plc.py): reject station {self.window_ms} ms after the trigger")
        print(f"  decisions received: {sum(decisions.values())} for {len(decisions)} parts")
        for text in report.summary_lines():
            print(f"  {text}")
        if self.run_out:
            print(f"  {self.run_out} parts run out at the end: decided on what had arrived once the agent had stopped")

    def phases(self, truth: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        rejected = {payload["part_id"] for _, payload in self.line.monitor.rejects}
        rows = phase_table(truth, self.line.dashboard.results, rejected)
        print(f"{'prompts':<28}{'parts':>7}{'defective':>11}{'rejected':>10}{'precision':>11}{'recall':>8}")
        for row in rows:
            print(
                f"{row['version']:<28}{row['parts']:>7}{row['defective']:>11}{row['rejected']:>10}"
                f"{row['precision']:>11.2f}{row['recall']:>8.2f}"
            )
            kinds = ", ".join(f"{k} {hit}/{n}" for k, (hit, n) in sorted(row["by_kind"].items()))
            print(f"{'':<28}rejected by kind: {kinds}")
        print()
        return rows

    def agent_checks(self, frames: dict[str, Any], answered: int) -> dict[str, bool]:
        monitor, dashboard = self.line.monitor, self.line.dashboard
        rejected = {payload["part_id"] for _, payload in monitor.rejects}
        ng = {pid for pid, r in dashboard.results.items() if r["verdict"] in ("NG", "ERROR")}
        expired = expired_rejects(self.work / "agent.log")
        checks = {
            "results published": dashboard.entries > 0,
            "rejects reached the PLC": bool(monitor.rejects),
            "every NG/ERROR result reached the PLC as a reject, or expired and was counted": ng <= rejected | expired,
        }
        if not frames:
            return {**checks, "the agent logged its final accounting": False}
        identity = frames["accepted"] == frames["published"] + sum(frames["dropped"].values()) + frames["expired"]
        checks["accounting identity holds, nothing in flight"] = identity and frames["in_flight"] == 0
        on_stream = frames["published"] + answered  # scored, and dropped ones answered ERROR
        name = f"every published result is on the stream ({frames['published']} scored + {answered} answered drops)"
        checks[name] = on_stream == dashboard.entries
        return checks

    def footer(self) -> None:
        host, port, prefix, redis_url = self.where
        print()
        print("Watch a line live (while `genclip run` is running):")
        print(f"  mosquitto_sub -h {host} -p {port} -V mqttv5 -v -t '{prefix}/{LINE}/#'")
        print(f"  redis-cli -u {redis_url} XREAD BLOCK 0 STREAMS genclip:{LINE}:results '$'")
        print(f"Files: {self.work} (agent.log, train.log, demo.toml, *-truth.jsonl, runs/demo/)")
        print("The scores come from random weights: put real CLIP weights in [model].pretrained for real")
        print("inspection (docs/deploy.md). Recall here is what learned prompts reach on synthetic defects.")


if __name__ == "__main__":
    sys.exit(main())
