"""The live page in a real browser: headless Chromium (Debian's, driven by Playwright) against `genclip run`.

Two synthetic cameras on genclip-tiny (random weights: which parts are NG says nothing about GenCLIP, only
that the page shows what the agent published). One agent run, in order:
- a tile per camera whose live image loads (naturalWidth > 0) and changes; the NG counter rises;
- a click on an NG thumbnail opens its full frame and anomaly map;
- without a login, pause and a threshold are refused (the page says so; the API answers 401);
- after a token login, a threshold set on the page round-trips: the agent's answer, the retained MQTT info
  (`classes.<class>.threshold`, source `command`) and the page's class panel; marking a part is recorded
  in the Redis stream `genclip:<line>:reviews`; a screenshot is saved as a test artefact
  (`test-artefacts/page/` in the repository, or $GENCLIP_TEST_ARTEFACTS);
- with the MQTT broker killed the page keeps updating and shows `mqtt: down`;
- closing the browser stops the encoding: `genclip_page_viewers` drops to 0 and
  `genclip_page_frames_encoded_total` stops rising.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.brokers import MosquittoServer, RedisServer, free_port
from tests.faults_support import crash, retained, wait_for
from tests.page_support import ARTEFACTS, TOKEN, chromium, page_config, running_agent, scrape, total

pytestmark = pytest.mark.fault  # kills a broker
LINE = "page"
HASH_JS = """(img) => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let h = 0;
  for (let i = 0; i < data.length; i += 3) h = (h * 31 + data[i]) | 0;
  return h;
}"""


def counts(page: Any, cls: str) -> int:
    return int(sum(int(t) for t in page.locator(f".tile .{cls}").all_inner_texts()))


def info_threshold(port: int, product_class: str) -> tuple[float, str] | None:
    text = retained(port, f"genclip/{LINE}/info", timeout=3.0)
    if text is None:
        return None
    entry = json.loads(text)["classes"].get(product_class, {})
    return entry.get("threshold"), entry.get("threshold_source")


def test_live_page_in_chromium(tmp_path: Path, fresh_mosquitto: MosquittoServer, fresh_redis: RedisServer) -> None:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = page_config(tmp_path, fresh_mosquitto.port, fresh_redis.url, port, LINE)
    artefacts = ARTEFACTS / "page"
    artefacts.mkdir(parents=True, exist_ok=True)
    with running_agent(config, tmp_path / "agent.log"), sync_playwright() as pw:

        def running() -> bool:
            try:
                return total(scrape(base), "genclip_results_published_total") > 0
            except OSError:
                return False

        wait_for(running, 120, "the agent publishing results")
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "/")

        # a tile per camera, its live image loaded and changing
        page.wait_for_function("document.querySelectorAll('.tile').length === 2", timeout=30_000)
        assert page.locator(".tile").evaluate_all("ts => ts.map(t => t.dataset.camera)") == ["cam-1", "cam-2"]
        for camera in ("cam-1", "cam-2"):
            live = page.locator(f'.tile[data-camera="{camera}"] img.live')
            page.wait_for_function("img => img.naturalWidth > 0", arg=live.element_handle(), timeout=30_000)
            first = live.evaluate(HASH_JS)
            wait_for(lambda live=live, first=first: live.evaluate(HASH_JS) != first, 30, f"{camera}'s image to change")
        samples = scrape(base)
        assert total(samples, "genclip_page_viewers") == 2  # one MJPEG stream per tile
        assert total(samples, "genclip_page_frames_encoded_total") > 0

        # the NG counter rises as parts pass
        ng_before = counts(page, "count-NG")
        wait_for(lambda: counts(page, "count-NG") > ng_before, 60, "the NG counter to rise")
        assert counts(page, "count-parts") >= counts(page, "count-NG")

        # an NG thumbnail opens its full frame and map
        thumb = page.locator("#ng figure img").first
        thumb.wait_for(timeout=30_000)
        page.wait_for_function("img => img.naturalWidth > 0", arg=thumb.element_handle(), timeout=30_000)
        thumb.click()
        page.wait_for_function("document.querySelector('#part').open", timeout=10_000)
        for image in ("#part-frame", "#part-map"):
            page.wait_for_function(f"document.querySelector('{image}').naturalWidth > 0", timeout=10_000)
        assert page.locator("#part-title").inner_text().startswith("NG")

        # no login: marking, pausing and thresholds are refused
        page.click("#mark-defect")
        page.wait_for_function("document.querySelector('#mark-result').textContent.includes('refused')")
        assert "login" in page.inner_text("#mark-result")
        page.keyboard.press("Escape")
        page.locator('.tile[data-camera="cam-1"] button.pause').click()
        page.wait_for_function("document.querySelector('#notice').textContent.includes('refused')")
        assert "login" in page.inner_text("#notice")
        refused = page.evaluate(
            """async () => (await fetch('/api/classes/widget/threshold', {method: 'POST',
               headers: {'Content-Type': 'application/json'}, body: JSON.stringify({value: 0.9})})).status"""
        )
        assert refused == 401
        assert info_threshold(fresh_mosquitto.port, "widget") != (0.9, "command")
        assert page.locator('.tile[data-camera="cam-1"] .paused').is_hidden()

        # log in with the token; a threshold set on the page round-trips to the MQTT info and back
        page.fill("#login-token", TOKEN)
        page.click("#login button[type=submit]")
        page.wait_for_function("document.querySelector('#who').textContent.includes('logged in: token')")
        widget = page.locator('.class[data-class="widget"]')
        assert "good images" in widget.locator(".calibration").inner_text()  # calibrated at start on [references]
        widget.locator(".new-threshold").fill("0.777")
        widget.locator(".set-threshold").click()
        page.wait_for_function("document.querySelector('#notice').textContent.includes('set to 0.777')")
        wait_for(lambda: info_threshold(fresh_mosquitto.port, "widget") == (0.777, "command"), 15, "the MQTT info")
        page.wait_for_function(
            """() => { const c = document.querySelector('.class[data-class="widget"]');
                       return c.querySelector('.value').textContent === '0.7770'
                         && c.querySelector('.source').textContent === 'from command'; }""",
            timeout=10_000,
        )

        # marking a part as a defect is recorded in Redis for review
        page.locator("#ng figure img").first.click()
        page.click("#mark-defect")
        page.wait_for_function("document.querySelector('#mark-result').textContent.includes('recorded')")
        reviews = redis.Redis.from_url(fresh_redis.url).xrange(f"genclip:{LINE}:reviews")
        assert len(reviews) == 1 and reviews[0][1][b"label"] == b"defect" and reviews[0][1][b"user"] == b"token"
        assert reviews[0][1][b"verdict"] == b"NG"
        page.keyboard.press("Escape")
        page.screenshot(path=str(artefacts / "live-page.png"), full_page=True)

        # the MQTT broker down: the page keeps updating and says so
        crash(fresh_mosquitto)
        page.wait_for_function("document.querySelector('#broker-mqtt').textContent === 'mqtt: down'", timeout=30_000)
        last = page.locator('.tile[data-camera="cam-2"]').get_attribute("data-last-part")
        page.wait_for_function(
            "last => document.querySelector('.tile[data-camera=\"cam-2\"]').dataset.lastPart !== last",
            arg=last,
            timeout=30_000,
        )
        page.screenshot(path=str(artefacts / "live-page-mqtt-down.png"), full_page=True)
        assert not errors, errors

        # closing the browser stops the encoding
        browser.close()
        wait_for(lambda: total(scrape(base), "genclip_page_viewers") == 0, 15, "no viewers left")
        encoded = total(scrape(base), "genclip_page_frames_encoded_total")
        time.sleep(2.0)  # parts keep coming at 3/s per camera
        assert total(scrape(base), "genclip_page_frames_encoded_total") == encoded
        assert total(scrape(base), "genclip_page_event_clients") == 0
