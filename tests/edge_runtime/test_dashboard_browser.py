"""The dashboard in a real browser: headless Chromium against a live site (real Mosquitto, the
aggregator with the shipped parking-lot model, simulated nodes in real time). The page must show
every node, a result within a few seconds, and a node killed mid-test as offline. The screenshot
goes to build/dashboard.png (docs/dashboard.png in the README is a copy of one)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from edge_runtime.config import AggregatorConfig
from edge_runtime.service import Aggregator
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
from spar_wire.mqtt_settings import MqttSettings
from spar_wire.site_layout import load_site_layout

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "configs/sites/parking_lot.toml"
MODEL = REPO / "models/parking_lot/model.int8.dynamic.manifest.json"
SCREENSHOT = REPO / "build" / "dashboard.png"
RUN_S = 40.0  # the nodes run this long: room for every wait below on a loaded machine
PARAMS = {"max_vehicles": 1, "empty_fraction": 0.1}
pytestmark = pytest.mark.mosquitto


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (make test installs Debian's chromium when it can)")


class Browser:
    """Headless Chromium driven over the DevTools protocol: one page, live, as a person keeps it open."""

    def __init__(self, profile: Path):
        self.process = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--hide-scrollbars", "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        active = profile / "DevToolsActivePort"
        assert wait_for(active.exists, 30.0), "Chromium did not open its DevTools port"
        assert wait_for(lambda: len(active.read_text().split()) >= 2, 5.0)
        port = active.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self._id = 0

    def call(self, method: str, **params):
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        for _ in range(10_000):  # events interleave with the answer; bounded
            reply = json.loads(self.socket.recv(timeout=30))
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply.get("result", {})
        raise AssertionError(f"no answer to {method}")

    def value(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        self.socket.close()
        self.process.kill()
        self.process.wait(10)


NODE_STATES = ("Object.fromEntries([...document.querySelectorAll('#map g.node')]"
               ".map(g => [g.dataset.node, g.dataset.state]))")
ROWS = "document.querySelectorAll('#results tbody tr').length"


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_the_page_shows_the_live_site_and_a_node_that_dies(mosquitto, tmp_path):
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port)
    config = AggregatorConfig(site=SITE, model=MODEL, database=tmp_path / "results.sqlite3", metrics_port=0,
                              mqtt=settings)
    layout = load_site_layout(SITE)
    start_ns = time.time_ns() // 1_000_000_000 * 1_000_000_000  # window 0 starts now (node clocks are right)
    seven = FieldConfig(layout=layout, source=SourceSpec("parking_lot", 3, PARAMS), duration_s=RUN_S, mqtt=settings,
                        start_epoch_ns=start_ns, node_ids=tuple(n.id for n in layout.nodes[:-1]), realtime=True)
    with Aggregator(config) as agg:
        url = f"http://127.0.0.1:{agg.metrics.port}/"
        others = threading.Thread(target=run_field, args=(seven,), daemon=True)
        others.start()
        # n08 in a process of its own, so that it can die the way a node dies: no goodbye
        n08 = subprocess.Popen([sys.executable, "-c", _ONE_NODE, str(SITE), mosquitto.host, str(mosquitto.port),
                                str(start_ns), str(RUN_S)])
        browser = None
        try:
            browser = Browser(tmp_path / "chromium")
            browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=860, deviceScaleFactor=1,
                         mobile=False)
            browser.call("Page.navigate", url=url)
            assert wait_for(lambda: len(browser.value(NODE_STATES) or {}) == len(layout.nodes), 15.0), \
                browser.value(NODE_STATES)
            # a result within a few seconds of the first window's end, in the table and on the map
            assert wait_for(lambda: (browser.value(ROWS) or 0) >= 1, 12.0), "no result on the page"
            assert browser.value("document.querySelectorAll('#map g.estimate').length") >= 1
            assert browser.value("document.body.dataset.live") == "yes"
            rows = browser.value(ROWS)
            assert wait_for(lambda: browser.value(ROWS) > rows, 6.0), "no live result arrived on the open page"
            # n08's process takes a few seconds to start; then every node is up on the page
            assert wait_for(lambda: all(s in ("online", "late") for s in browser.value(NODE_STATES).values()),
                            20.0), json.dumps(browser.value(NODE_STATES))
            n08.kill()  # no goodbye: the broker's will tells the aggregator, the event stream tells the page
            assert wait_for(lambda: browser.value(NODE_STATES).get("n08") == "offline", 12.0), \
                browser.value(NODE_STATES)
            assert browser.value(NODE_STATES)["n01"] in ("online", "late")
            shot = browser.call("Page.captureScreenshot", format="png")["data"]
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(base64.b64decode(shot))
            assert SCREENSHOT.stat().st_size > 20_000
        finally:
            if browser is not None:
                browser.close()
            n08.kill()
            n08.wait(10)
            others.join(RUN_S + 10)


_ONE_NODE = """
import sys
from spar_wire.site_layout import load_site_layout
from spar_wire.mqtt_settings import MqttSettings
from node_firmware_sim.field_runner import FieldConfig, SourceSpec, run_field
site, host, port, start_ns, run_s = sys.argv[1:]
run_field(FieldConfig(layout=load_site_layout(site), source=SourceSpec("parking_lot", 3,
          {"max_vehicles": 1, "empty_fraction": 0.1}), duration_s=float(run_s),
          mqtt=MqttSettings(host=host, port=int(port)), start_epoch_ns=int(start_ns), node_ids=("n08",),
          realtime=True))
"""
