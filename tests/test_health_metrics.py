"""Metrics exposition and the health server, over real HTTP on loopback."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from agent.health import HealthServer, HealthServerError
from agent.metrics import AgentMetrics


def samples(metrics: AgentMetrics) -> dict[tuple[str, frozenset], float]:
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_counters_histograms_gauges_and_info_render():
    m = AgentMetrics()
    m.add_camera("cam-1")
    m.frames_captured.labels(camera="cam-1").inc(3)
    m.dropped("cam-1", "stale")
    m.results_published.labels(camera="cam-1", verdict="reject").inc()
    m.prompt_reloads.labels(outcome="refused").inc()
    m.batch_size.observe(5)
    m.inference_seconds.observe(0.02)
    m.capture_to_publish_seconds.labels(kind="reject").observe(0.3)
    depth = [7]
    m.watch_queue("frames", lambda: depth[0])
    m.broker_up.labels(sink="mqtt").set(1)
    m.set_prompt("2024-06-01", "ViT-L-14-336", "/var/lib/genclip/prompts/a.safetensors")

    assert value(m, "genclip_frames_captured_total", camera="cam-1") == 3
    assert value(m, "genclip_frames_dropped_total", camera="cam-1", reason="stale") == 1
    assert value(m, "genclip_frames_dropped_total", camera="cam-1", reason="queue_full") == 0  # pre-created
    assert value(m, "genclip_frame_errors_total", camera="cam-1") == 0
    assert value(m, "genclip_camera_up", camera="cam-1") == 0
    assert value(m, "genclip_results_published_total", camera="cam-1", verdict="reject") == 1
    assert value(m, "genclip_prompt_reloads_total", outcome="refused") == 1
    assert value(m, "genclip_batch_size_bucket", le="8.0") == 1
    assert value(m, "genclip_batch_size_bucket", le="4.0") == 0
    assert value(m, "genclip_inference_seconds_bucket", le="0.001") == 0
    assert value(m, "genclip_inference_seconds_bucket", le="5.0") == 1
    assert value(m, "genclip_capture_to_publish_seconds_bucket", kind="reject", le="10.0") == 1
    assert value(m, "genclip_queue_depth", queue="frames") == 7
    depth[0] = 2
    assert value(m, "genclip_queue_depth", queue="frames") == 2
    assert value(m, "genclip_broker_up", sink="mqtt") == 1
    info = {"version": "2024-06-01", "backbone": "ViT-L-14-336", "path": "/var/lib/genclip/prompts/a.safetensors"}
    assert value(m, "genclip_prompt_info", **info) == 1
    assert "# HELP genclip_frames_dropped_total Frames discarded" in m.render().decode()
    with pytest.raises(ValueError, match="unknown drop reason"):
        m.dropped("cam-1", "bored")  # type: ignore[arg-type]


def test_stats_source_is_read_at_every_scrape():
    m = AgentMetrics()
    stats = {"reject": {"sent": 3, "expired": 1, "dropped": 0}, "result": {"sent": 10}}
    m.add_stats_source("mqtt", lambda: stats)
    m.add_stats_source("broken", lambda: 1 / 0)  # a failing source is skipped, the scrape still works
    assert value(m, "genclip_messages_total", sink="mqtt", kind="reject", outcome="sent") == 3
    assert value(m, "genclip_messages_total", sink="mqtt", kind="reject", outcome="expired") == 1
    assert value(m, "genclip_messages_total", sink="mqtt", kind="result", outcome="sent") == 10
    stats["reject"]["sent"] = 5
    assert value(m, "genclip_messages_total", sink="mqtt", kind="reject", outcome="sent") == 5
    assert "# TYPE genclip_messages_total counter" in m.render().decode()
    with pytest.raises(ValueError, match="already registered"):
        m.add_stats_source("mqtt", dict)


def test_two_instances_do_not_clash():
    a, b = AgentMetrics(), AgentMetrics()
    a.frames_processed.labels(camera="x").inc()
    a.add_stats_source("mqtt", lambda: {"result": {"sent": 1}})
    b.add_stats_source("mqtt", lambda: {"result": {"sent": 2}})
    assert value(a, "genclip_frames_processed_total", camera="x") == 1
    assert value(b, "genclip_frames_processed_total", camera="x") is None
    assert value(b, "genclip_messages_total", sink="mqtt", kind="result", outcome="sent") == 2


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


@pytest.fixture
def serve():
    servers: list[HealthServer] = []

    def start(checks, metrics=None):
        server = HealthServer("127.0.0.1", 0, metrics or AgentMetrics(), checks)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop()


def test_healthz_ok_unhealthy_and_failing_check(serve):
    reasons: list[str] = []
    base = serve(lambda: reasons)
    status, ctype, body = get(base + "/healthz")
    assert (status, ctype, json.loads(body)) == (200, "application/json", {"status": "ok"})

    reasons[:] = ["camera cam-1: no frame for 12 s", "mqtt: disconnected"]
    status, _, body = get(base + "/healthz")
    assert status == 503
    assert json.loads(body) == {"status": "unhealthy", "reasons": reasons}

    def broken() -> list[str]:
        raise RuntimeError("engine worker gone")

    status, _, body = get(serve(broken) + "/healthz")
    assert status == 503
    assert json.loads(body)["reasons"] == ["health check failed: RuntimeError: engine worker gone"]


def test_metrics_index_and_404(serve):
    metrics = AgentMetrics()
    metrics.frames_captured.labels(camera="cam-9").inc()
    base = serve(list, metrics)
    status, ctype, body = get(base + "/metrics")
    assert status == 200 and ctype == CONTENT_TYPE_LATEST
    assert b'genclip_frames_captured_total{camera="cam-9"} 1.0' in body
    status, _, body = get(base + "/")
    assert status == 200 and set(json.loads(body)["endpoints"]) == {"/healthz", "/metrics"}
    assert get(base + "/nope")[0] == 404


def test_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = HealthServer("127.0.0.1", port, AgentMetrics(), list)
        with pytest.raises(HealthServerError, match=rf"127\.0\.0\.1:{port}.*already in use.*\[agent\]\.health_port"):
            server.start()


def test_requests_are_logged_at_debug_not_printed(serve, capsys):
    base = serve(list)
    logged = lambda: any(e["log_level"] == "debug" and "GET /healthz" in e.get("request", "") for e in logs)  # noqa: E731
    with capture_logs() as logs:
        get(base + "/healthz")
        deadline = time.monotonic() + 5  # logged once answered, on the server's thread: after the client has it
        while not logged() and time.monotonic() < deadline:
            time.sleep(0.01)
    captured = capsys.readouterr()
    assert "GET /healthz" not in captured.out + captured.err  # http.server's own access line goes to stderr
    assert logged()


def test_camera_up_and_broker_up_are_read_at_scrape_time():
    """The gauges follow the camera's and the sink's state without anyone setting them (health checks
    only read)."""
    from datetime import UTC, datetime

    from agent.sources.base import SourceStatus

    m = AgentMetrics()
    m.add_camera("cam-1")
    state = ["starting"]
    link = [(False, "connecting")]
    m.watch_camera("cam-1", lambda: SourceStatus("cam-1", state[0], "", 0, 0, datetime.now(UTC)))
    m.watch_sink("mqtt", lambda: link[0])
    assert value(m, "genclip_camera_up", camera="cam-1") == 0
    assert value(m, "genclip_broker_up", sink="mqtt") == 0
    state[0], link[0] = "running", (True, "connected")
    assert value(m, "genclip_camera_up", camera="cam-1") == 1
    assert value(m, "genclip_broker_up", sink="mqtt") == 1
    state[0], link[0] = "stalled", (False, "broker unreachable")
    assert value(m, "genclip_camera_up", camera="cam-1") == 0
    assert value(m, "genclip_broker_up", sink="mqtt") == 0
