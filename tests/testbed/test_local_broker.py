import socket
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from testbed.errors import TestbedError
from testbed.local_broker import BrokerSettings, LocalBroker


def test_broker_listens_on_loopback_only(mosquitto):
    assert mosquitto.host == "127.0.0.1" and mosquitto.running
    with socket.create_connection(("127.0.0.1", mosquitto.port), timeout=2):
        pass
    assert f"listener {mosquitto.port} 127.0.0.1" in (mosquitto.workdir / "mosquitto.conf").read_text()


def test_retained_message_survives_a_restart(mosquitto):
    """Persistence is on: a graceful restart keeps retained messages."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    client.publish("spar/v1/t/n1/state", b"kept", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    mosquitto.restart()
    got = []
    reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    reader.on_message = lambda c, u, m: got.append(m.payload)
    reader.on_connect = lambda c, u, f, rc, p: c.subscribe("spar/v1/t/#", qos=1)
    reader.connect("127.0.0.1", mosquitto.port)
    reader.loop_start()
    try:
        import time

        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        reader.disconnect()
        reader.loop_stop()
    assert got == [b"kept"]


def test_bad_config_reports_the_broker_log(tmp_path):
    broker = LocalBroker(BrokerSettings(extra_lines=("no_such_option 1",)), workdir=tmp_path,
                         start_timeout_s=3)
    with pytest.raises(TestbedError, match="no_such_option|failed to start"):
        broker.start()
    broker.close()


def test_missing_binary_says_how_to_install(tmp_path, monkeypatch):
    broker = LocalBroker(workdir=tmp_path)
    broker.binary = None
    with pytest.raises(TestbedError, match="apt-get install mosquitto"):
        broker.start()


@pytest.mark.mosquitto
def test_the_broker_does_not_outlive_a_killed_parent(tmp_path):
    """A benchmark killed without clean-up must not leave Mosquitto saving into a folder a later run reuses."""
    import os
    import subprocess
    import sys
    import time

    script = ("import os\nfrom testbed.local_broker import LocalBroker\n"
              f"b = LocalBroker(workdir={str(tmp_path / 'b')!r}).start()\n"
              "print(b._proc.pid, flush=True)\nos._exit(0)\n")
    pid = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[2]).stdout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return  # gone (reaped)
        if "\nState:\tZ" in state:
            return  # dead, waiting for init to reap it
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("mosquitto outlived its parent")
