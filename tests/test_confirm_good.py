"""confirm-good over MQTT: parts confirmed good grow their class's patch memory, bounded, and a restart keeps it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.commands import dispatch
from agent.config import InspectConfig
from agent.control import parse_command
from agent.service import InspectionService
from synthetic.textures import instance_seed, render_texture
from tests.factories import tiny_config
from tests.test_agent import Watcher, wait_for
from tests.test_commands import line as fake_line


def config(tmp_path: Path, mqtt_port: int, redis_url: str, **agent: Any) -> InspectConfig:
    references = tmp_path / "references"
    references.mkdir(exist_ok=True)
    for i in range(8):
        cv2.imwrite(str(references / f"good-{i}.png"), render_texture("metal", instance_seed(5, i), 160))
    model = tiny_config(image_size=96, memory_weight=0.5, memory_max_images=10, profile_dir=tmp_path / "profiles")
    return InspectConfig(
        line={"id": "mem"},
        model=model.model_dump(exclude_none=True, by_alias=True),
        engine={"batch_size": 4, "max_wait_ms": 20},
        cameras=[
            {
                "id": "cam-1",
                "source": "synthetic:1",
                "product_class": "widget",
                "fps": 10,
                "queue_policy": "block",
                "max_age_ms": 0,
                "synthetic": {"defect_rate": 0.3, "seed": 1, "width": 160, "height": 120},
            }
        ],
        references={"widget": str(references)},
        mqtt={"port": mqtt_port, "decision_window_ms": 30_000},
        redis={"url": redis_url, "maps": "none"},
        agent={"health_port": 0, "shutdown_timeout_s": 10, "state_dir": str(tmp_path / "state"), **agent},
    )


@pytest.fixture
def start() -> Iterator[Callable[[InspectConfig], InspectionService]]:
    services: list[InspectionService] = []

    def run(cfg: InspectConfig) -> InspectionService:
        services.append(InspectionService(cfg))
        services[-1].start()
        return services[-1]

    yield run
    for service in services:
        if not service._stop.is_set():
            service.shutdown()


def command(port: int, name: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """Send one command with a correlation id and wait for its answer on cmd/response."""
    answers: list[dict[str, Any]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"operator-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if getattr(message.properties, "CorrelationData", None) == b"memory":
            answers.append(json.loads(message.payload))

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe("genclip/mem/cmd/response", qos=1)
    client.loop_start()
    time.sleep(0.3)
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"memory"
    client.publish(f"genclip/mem/cmd/{name}", json.dumps(body), qos=1, properties=props)
    try:
        wait_for(lambda: answers, timeout, f"the answer to {name}")
    finally:
        client.loop_stop()
        client.disconnect()
    return answers[0]


def test_confirm_good_grows_the_memory_bounded_and_a_restart_keeps_it(tmp_path, mosquitto, redis_server, start):
    cfg = config(tmp_path, mosquitto.port, redis_server.url, confirm_good=True, confirm_good_parts=16)
    watcher = Watcher(mosquitto.port, "mem")
    try:
        service = start(cfg)
        wait_for(lambda: len(watcher.of("cam-1/result")) >= 4, 60, "results")
        parts = [r["part_id"] for r in watcher.of("cam-1/result")[:3]]
        assert service.info()["classes"]["widget"]["memory"]["images"] == 8  # the references
        answer = command(mosquitto.port, "confirm-good", {"parts": [*parts, "no-such-part"]})
        assert answer["ok"], answer
        assert answer["classes"]["widget"] == {"images": 10, "confirmed": 2, "patches": 10 * 36}  # bounded: 8 + 2
        assert answer["unknown_parts"] == ["no-such-part"]
        memory = service.info()["classes"]["widget"]["memory"]
        assert memory["images"] == 10 and memory["confirmed"] == 2 and memory["updated_at"]
        refused = command(mosquitto.port, "confirm-good", {"parts": ["no-such-part"]})
        assert not refused["ok"] and "among the last 16 parts" in refused["error"]
        threshold = service.info()["classes"]["widget"]["threshold"]
        service.shutdown()
        restarted = start(cfg)
        info = restarted.info()["classes"]["widget"]
        assert info["memory"]["images"] == 10 and info["memory"]["confirmed"] == 2  # kept across the restart
        assert info["threshold"] == threshold and info["threshold_source"] == "calibration"
    finally:
        watcher.close()


def test_confirm_good_is_off_by_default_and_needs_a_profile_folder(tmp_path):
    fake = fake_line(config=type("C", (), {"agent": type("A", (), {"confirm_good": False})()})())
    with pytest.raises(ValueError, match=r"confirm-good is off on this line \(\[agent\].confirm_good = false\)"):
        dispatch(fake, parse_command("confirm-good", b'{"parts": ["p-1"]}'))
    with pytest.raises(Exception, match=r"agent.confirm_good: needs \[model\].profile_dir"):
        InspectConfig(model=tiny_config().model_dump(exclude_none=True), agent={"confirm_good": True})
    with pytest.raises(Exception, match="parts"):
        parse_command("confirm-good", b'{"parts": []}')


def test_a_part_marked_good_on_the_live_page_joins_the_memory(tmp_path, mosquitto, redis_server, start):
    """The page's "mark good" is the confirm-good command when the line grows memories ([agent].confirm_good)."""
    import urllib.request

    from agent.page.config import PageConfig
    from tests.brokers import free_port

    port, token = free_port(), "a-long-enough-token"
    cfg = config(tmp_path, mosquitto.port, redis_server.url, confirm_good=True, health_port=port)
    cfg = cfg.model_copy(update={"page": PageConfig(enabled=True, token=token)})
    watcher = Watcher(mosquitto.port, "mem")
    try:
        service = start(cfg)
        wait_for(lambda: len(watcher.of("cam-1/result")) >= 2, 60, "results")

        def call(path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}",
                data=None if body is None else json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                method="GET" if body is None else "POST",
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                return json.loads(answer.read())

        part = call("/api/state")["latest"][0]
        answer = call(f"/api/parts/{part['n']}/review", {"label": "good"})
        assert answer["ok"] and answer["part_id"] == part["part_id"], answer
        assert answer["memory"].startswith("added to the patch memory"), answer
        memory = service.info()["classes"]["widget"]["memory"]
        assert memory["images"] == 9 and memory["confirmed"] == 1
        defect = call(f"/api/parts/{part['n']}/review", {"label": "defect"})
        assert defect["memory"] is None  # only parts marked good join the memory
    finally:
        watcher.close()


def test_genclip_line_confirm_good_from_a_shell(tmp_path, mosquitto, redis_server, start):
    """`genclip line confirm-good PART...` sends the command and says what the memory holds now."""
    from tests.test_line_verb import config_file, genclip

    cfg = config(tmp_path, mosquitto.port, redis_server.url, confirm_good=True)
    watcher = Watcher(mosquitto.port, "mem")
    try:
        service = start(cfg)
        wait_for(lambda: len(watcher.of("cam-1/result")) >= 2, 60, "results")
        part = watcher.of("cam-1/result")[0]["part_id"]
        said = genclip(config_file(tmp_path, cfg), "confirm-good", part, "no-such-part")
        assert said.exit_code == 0, said.output
        assert "widget: 9 images in the memory" in said.stdout and "no-such-part" in said.stdout, said.stdout
        assert service.info()["classes"]["widget"]["memory"]["confirmed"] == 1
    finally:
        watcher.close()
