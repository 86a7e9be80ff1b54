"""A private amqtt (pure Python) MQTT broker on a loopback port, for machines without Mosquitto.

Same use as :class:`testbed.local_broker.LocalBroker`: tests, the demo and trials start their own
broker on 127.0.0.1. The broker runs in a child process (``python -m testbed.embedded_broker``)
so that it does not compete with the aggregator for this interpreter's GIL.

amqtt speaks MQTT 3.1.1 only: clients must use ``MqttSettings(protocol=EmbeddedBroker.protocol)``.
It keeps everything in memory: sessions and retained messages do not survive a stop or a kill.

Two amqtt 0.12 behaviours are corrected in the child (see ``_broker_class`` and
``_auth_plugin_class``): with anonymous access allowed, amqtt drops every persistent session as
soon as its client disconnects, and a connecting client is sent the retained messages of every
topic filter any client has subscribed to, not only its own.

Known limits of amqtt 0.12, not corrected here: an MQTT 5 CONNECT with properties (what
``MqttSettings(protocol="5")`` sends) gets no CONNACK at all, so a client that forgot the protocol
times out instead of being refused; a QoS 1 message not acknowledged by its subscriber within 5 s is
dropped, never re-sent (fine with paho's automatic acks, not with manual acks held longer); messages
queued for an offline persistent session arrive with the retain flag set.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.local_broker import BrokerProcess

INSTALL_HINT = "install it with `pip install 'spar-edge[bench]'` (or `pip install amqtt`)"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def amqtt_available() -> bool:
    """Whether amqtt can be imported by this interpreter (and so by the broker child)."""
    return importlib.util.find_spec("amqtt") is not None


class EmbeddedBroker(BrokerProcess):
    """An amqtt broker child process on ``127.0.0.1:port``. Use as a context manager.

    ``kill`` resets every connection as a power cut would; ``restart`` starts a fresh broker on
    the same port, without the old sessions or retained messages (amqtt keeps them in memory only).
    """

    name = "amqtt"
    protocol = "3.1.1"  # what to put into MqttSettings(protocol=...): amqtt refuses MQTT 5

    def __init__(self, workdir: str | Path | None = None, port: int | None = None,
                 start_timeout_s: float = 10.0):
        super().__init__(workdir, port, start_timeout_s, prefix="spar-amqtt-")

    def _check_available(self) -> None:
        if not amqtt_available():
            raise TestbedError(f"amqtt not found: {INSTALL_HINT}")

    # ---------------------------------------------------------------- internals
    def _try_start(self, port: int) -> bool:
        ready = self.workdir / "ready"
        ready.unlink(missing_ok=True)
        command = [sys.executable, "-m", "testbed.embedded_broker", "--port", str(port),
                   "--log", str(self.log_path), "--ready-file", str(ready)]
        with open(self.workdir / "stderr.log", "ab") as err:
            # cwd: `-m testbed...` must find this package even where it is not installed.
            self._proc = subprocess.Popen(command, cwd=_PACKAGE_ROOT, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            # The child's own word first: a TCP connect alone would also succeed against another
            # process that already holds the port, while our child is still importing.
            if _read_pid(ready) == self._proc.pid and _mqtt_handshake(port):
                return True
            time.sleep(0.05)
        self.stop()
        return False


# MQTT 3.1.1 CONNECT (clean session, no keepalive, client id "spar-probe") and DISCONNECT.
_PROBE_CONNECT = b"\x10\x16\x00\x04MQTT\x04\x02\x00\x00\x00\x0aspar-probe"
_PROBE_DISCONNECT = b"\xe0\x00"


def _mqtt_handshake(port: int, timeout_s: float = 1.0) -> bool:
    """Connect, get a CONNACK (accepted), disconnect. A bare TCP connect that sends nothing makes
    amqtt log an ERROR for every start, which would mislead anyone reading ``log_tail``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(_PROBE_CONNECT)
            connack = b""
            while len(connack) < 4:
                chunk = sock.recv(4 - len(connack))
                if not chunk:
                    return False
                connack += chunk
            sock.sendall(_PROBE_DISCONNECT)
            return connack[0] == 0x20 and connack[3] == 0
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# -------------------------------------------------------------------- the child process
@functools.cache
def _auth_plugin_class() -> type:
    """amqtt's AnonymousAuthPlugin marks every session anonymous, and amqtt never keeps an
    anonymous session: a clean_session=False subscriber loses its subscriptions and queued QoS 1
    messages as soon as it disconnects. This plugin lets everyone in without that mark, as
    Mosquitto's ``allow_anonymous true`` does (the listener is loopback only)."""
    from amqtt.plugins.base import BaseAuthPlugin

    class LoopbackAuthPlugin(BaseAuthPlugin):
        async def authenticate(self, *, session: Any) -> bool:
            return True

    return LoopbackAuthPlugin


@functools.cache
def _broker_class() -> type:
    """amqtt's Broker, sending retained messages only for the connecting client's own subscriptions.

    amqtt 0.12 calls ``_publish_retained_messages_for_subscription`` for every topic filter in the
    broker when any client connects, so a publisher that subscribed to nothing received the
    retained births and states of every node, and the aggregator's subscriber would count retained
    messages of another site's topics, which it never subscribed to, as rejected.
    """
    from amqtt.broker import Broker

    class LoopbackBroker(Broker):
        async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                              session: Any) -> None:
            subscribers = self._subscriptions.get(subscription[0], ())
            if any(subscriber is session for subscriber, _ in subscribers):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return LoopbackBroker


def __getattr__(name: str) -> Any:
    # amqtt loads plugins by dotted path; building the class on first use keeps amqtt out of every
    # process that only starts or chooses a broker.
    if name == "LoopbackAuthPlugin":
        return _auth_plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def broker_config(port: int) -> dict[str, Any]:
    """amqtt configuration: one TCP listener on 127.0.0.1:port, everyone allowed, no $SYS topics."""
    module = __spec__.name if __spec__ else __name__  # "__main__" when run with -m
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 0}},
        # Like Mosquitto's default: persistent sessions never expire while the broker runs.
        "session_expiry_interval": None,
        # Replaces amqtt's defaults: packet logging and $SYS publishing would only add noise.
        "plugins": {f"{module}.LoopbackAuthPlugin": {}},
    }


async def _serve(port: int, ready_file: Path | None) -> int:
    from amqtt.errors import BrokerError

    broker = _broker_class()(broker_config(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await broker.start()
    except BrokerError as exc:
        # amqtt has logged the traceback; this last line is what log_tail() shows first.
        logging.getLogger(__name__).error("amqtt broker could not start on 127.0.0.1:%d: %s", port, exc)
        return 1
    logging.getLogger(__name__).info("amqtt broker listening on 127.0.0.1:%d (pid %d)", port, os.getpid())
    if ready_file is not None:
        ready_file.write_text(f"{os.getpid()}\n")
    orphan_watch = asyncio.create_task(_stop_when_orphaned(stop))
    await stop.wait()
    orphan_watch.cancel()
    await broker.shutdown()
    return 0


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    # A parent killed without stopping us (SIGKILL, a test runner's timeout) would otherwise leave
    # this broker holding its port for good.
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    logging.getLogger(__name__).warning("parent process %d is gone: stopping", parent)
    stop.set()


def main(argv: list[str] | None = None) -> int:
    """Run the amqtt broker on 127.0.0.1:--port until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m testbed.embedded_broker", description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, help="log file (default: stderr)")
    parser.add_argument("--ready-file", type=Path, help="written with our pid once the listener is up")
    args = parser.parse_args(argv)
    logging.basicConfig(filename=args.log, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # transitions logs every state change of every session at INFO.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    return asyncio.run(_serve(args.port, args.ready_file))


if __name__ == "__main__":
    sys.exit(main())
