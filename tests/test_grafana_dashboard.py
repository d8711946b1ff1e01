"""deploy/grafana/genclip.json in Grafana's dashboard schema; every metric it queries is on a running agent's /metrics.

The schema check uses grafana-foundation-sdk (Grafana's own types, generated from its schemas, with the
panel and Prometheus query plugins registered): the file is decoded into those types and encoded back;
every key the file has must come back with its value (a key the schema does not know is lost on the way,
a misspelt one too). The SDK fills in defaults the file leaves out; those are allowed. Then what Grafana
needs to lay the panels out: unique ids, every panel on the 24-column grid without overlapping, a
Prometheus query with a refId per target, the datasource variable.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.service import InspectionService
from tests.brokers import MosquittoServer, RedisServer
from tests.faults_support import fault_config, synthetic_camera, wait_for

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "genclip.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def lost_or_changed(original: Any, decoded: Any, path: str = "") -> list[str]:
    """Where `decoded` lost a key of `original` or holds another value (keys it added are defaults)."""
    if isinstance(original, dict) and isinstance(decoded, dict):
        problems = [f"{path}/{k}: not in Grafana's schema" for k in original if k not in decoded]
        for key in original:
            if key in decoded:
                problems += lost_or_changed(original[key], decoded[key], f"{path}/{key}")
        return problems
    if isinstance(original, list) and isinstance(decoded, list) and len(original) == len(decoded):
        pairs = enumerate(zip(original, decoded, strict=True))
        return [p for i, (a, b) in pairs for p in lost_or_changed(a, b, f"{path}[{i}]")]
    return [] if original == decoded else [f"{path}: {original!r} came back as {decoded!r}"]


def test_dashboard_loads_in_grafanas_schema() -> None:
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import prometheus
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel

    plugins.register_default_plugins()
    data = dashboard()
    decoded = Dashboard.from_json(data)
    assert lost_or_changed(data, json.loads(json.dumps(decoded, cls=JSONEncoder))) == []
    assert decoded.panels and all(isinstance(p, Panel) for p in decoded.panels)
    for panel in decoded.panels:
        assert isinstance(panel, Panel) and panel.targets, panel.title
        assert all(isinstance(t, prometheus.Dataquery) for t in panel.targets), panel.title

    # the check can fail: a misspelt panel key and a timeseries option Grafana does not have are caught
    broken = json.loads(DASHBOARD.read_text())
    broken["panels"][0]["gridPosition"] = broken["panels"][0].pop("gridPos")
    broken["panels"][1]["options"]["legend"]["placment"] = "bottom"
    again = json.loads(json.dumps(Dashboard.from_json(broken), cls=JSONEncoder))
    assert sorted(p.split(":")[0] for p in lost_or_changed(broken, again)) == [
        "/panels[0]/gridPosition",
        "/panels[1]/options/legend/placment",
    ]


def test_dashboard_layout_and_queries() -> None:
    data = dashboard()
    assert data["uid"] and data["title"] == "GenCLIP Inspect"
    assert {v["name"] for v in data["templating"]["list"]} == {"datasource", "instance"}
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in data["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] for t in panel["targets"])
    titles = " ".join(p["title"] for p in data["panels"]).lower()
    for topic in ("throughput", "latency", "dropped", "ng rate", "brokers", "cameras", "prompt version"):
        assert topic in titles


def test_provisioning_examples_point_at_the_dashboard() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "genclip.yaml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    source = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"


def queried_metrics() -> set[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    exprs += [json.dumps(v.get("query", "")) for v in dashboard()["templating"]["list"]]
    return {name for expr in exprs for name in re.findall(r"\bgenclip_[a-z_]+\b", expr)}


@pytest.mark.timeout(180)
def test_every_queried_metric_is_on_a_running_agents_metrics(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer
) -> None:
    cameras = [
        synthetic_camera("cam-1", 1, fps=4.0),
        synthetic_camera("cam-2", 2, fps=4.0, acquisition="triggered", trigger="mqtt"),  # trigger counters
    ]
    service = InspectionService(fault_config(mosquitto.port, redis_server.url, "grafana", cameras))
    service.start()
    try:

        def scraped() -> set[str]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{service.health.port}/metrics", timeout=5).read()
            return {line.split("{")[0].split(" ")[0] for line in text.decode().splitlines() if not line.startswith("#")}

        wait_for(lambda: "genclip_capture_to_publish_seconds_bucket" in scraped(), 60, "a published result")
        names = scraped()
    finally:
        service.shutdown()
    wanted = queried_metrics()
    assert len(wanted) >= 12, wanted
    assert sorted(wanted - names) == []
