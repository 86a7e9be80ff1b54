"""Start a private Mosquitto on a free loopback port with a generated config.

Tests, the demo and trials use this; none of them relies on a system broker service. The broker
listens on 127.0.0.1 only, keeps its config, log and persistence files in its own directory, and
can be killed (SIGKILL) and restarted on the same port for fault tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import TestbedError

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
_INSTALL_HINT = "install it with `sudo apt-get install mosquitto` (or run `make test`, which does)"


def find_mosquitto() -> str | None:
    """Path of a mosquitto binary: $SPAR_MOSQUITTO, then PATH, then the usual sbin folders."""
    env = os.environ.get("SPAR_MOSQUITTO")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class BrokerSettings:
    persistence: bool = True  # keep sessions and queued QoS 1 messages across restarts
    autosave_interval_s: int = 1  # how often in-memory state is written; 0 = only on exit
    # True: autosave_interval counts changes instead of seconds, so with 1 every queued message is
    # saved at once and a SIGKILL loses at most the one being handled (see configs/mosquitto/).
    autosave_on_changes: bool = False
    # QoS 1 messages sent to one client and not yet acknowledged. Mosquitto's default of 20 applies to
    # MQTT 5 clients too; an aggregator that acknowledges a message only once its window is stored
    # holds every message of the open and queued windows, so 20 would stall any site of > 20 nodes.
    max_inflight_messages: int = 1000
    max_queued_messages: int = 100_000  # per client while offline (Mosquitto's default is 1000)
    message_size_limit: int = 0  # bytes, 0 = Mosquitto's default (no limit below 256 MB)
    extra_lines: tuple[str, ...] = ()  # appended verbatim (ACL, password_file, TLS listener...)


def die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started us dies.

    A benchmark killed without its clean-up would otherwise leave Mosquitto running, still saving
    its persistence file every second into a folder the next run reuses: two brokers renaming one
    file made the next run's broker fail ("No such file or directory") and drop its clients. The
    signal follows the starting *thread*; brokers are started from long-lived threads here.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the broker outlives a killed parent
        pass


class BrokerProcess:
    """A broker child process on ``127.0.0.1:port``, started, stopped, killed and restarted the same
    way whatever the broker. Subclasses say how to start one (``_try_start``) and where it logs.
    Use as a context manager."""

    name = "broker"
    protocol = "5"  # what clients put into MqttSettings(protocol=...)

    def __init__(self, workdir: str | Path | None = None, port: int | None = None,
                 start_timeout_s: float = 10.0, *, prefix: str = "spar-broker-"):
        self._own_dir = workdir is None
        # Absolute: the broker's config names its files, and it need not share our working directory.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=prefix)).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.host = "127.0.0.1"
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None

    # ---------------------------------------------------------------- what a broker says
    def _check_available(self) -> None:
        """TestbedError (with an install hint) when this broker cannot run here."""

    def _try_start(self, port: int) -> bool:
        """Start the child on ``port``; True once it serves clients, False if it failed."""
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> BrokerProcess:
        """Start the broker and wait until it accepts connections."""
        self._check_available()
        attempts = 1 if self.port else 3  # a chosen free port can be taken before the child binds it
        for _ in range(attempts):
            port = self.port or free_loopback_port()
            if self._try_start(port):
                self.port = port
                return self
        raise TestbedError(f"{self.name} failed to start after {attempts} attempt(s); log:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Graceful stop (SIGTERM): Mosquitto saves its persistence file on the way out."""
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout_s)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: no save on exit, as when power is cut."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5.0)
        self._proc = None

    def restart(self) -> None:
        """Start again on the same port (Mosquitto: with the same persistence directory)."""
        self.stop()
        if not self._try_start(self.port):
            raise TestbedError(f"{self.name} did not restart on port {self.port}; log:\n{self.log_tail()}")

    def close(self) -> None:
        """Stop the broker and remove its directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the broker log and of its stderr (where config errors go)."""
        text = []
        for path in (self.workdir / "stderr.log", self.log_path):
            try:
                text += path.read_text(errors="replace").splitlines()
            except OSError:
                continue
        return "\n".join(text[-lines:]) or "(no log)"


class LocalBroker(BrokerProcess):
    """A Mosquitto child process on ``127.0.0.1:port``. Use as a context manager."""

    name = "mosquitto"
    protocol = "5"

    def __init__(self, settings: BrokerSettings | None = None, workdir: str | Path | None = None,
                 port: int | None = None, start_timeout_s: float = 10.0, *,
                 config_file: str | Path | None = None, config_text: str | None = None):
        """``config_file`` / ``config_text``: run this Mosquitto config instead of one generated from
        ``settings`` (e.g. a site's secured config), with its one ``listener`` line moved to
        ``127.0.0.1:<port>`` (see :func:`substitute_listener`). A file is read again at every start
        and :meth:`reload`, so edits reach the broker."""
        super().__init__(workdir, port, start_timeout_s, prefix="spar-mosquitto-")
        if config_file is not None and config_text is not None:
            raise TestbedError("give config_file or config_text, not both")
        self.settings = settings or BrokerSettings()
        self.binary = find_mosquitto()
        self.config_file = Path(config_file) if config_file is not None else None
        self.given_config = config_text

    def reload(self) -> None:
        """SIGHUP: Mosquitto reloads its config, password file and ACL (and drops clients that no
        longer authenticate). Returns at once; the reload itself takes a moment."""
        if not self.running:
            raise TestbedError(f"{self.name} is not running")
        (self.workdir / "mosquitto.conf").write_text(self.config_text(self.port))
        self._proc.send_signal(signal.SIGHUP)

    def _check_available(self) -> None:
        if self.binary is None:
            raise TestbedError(f"mosquitto not found: {_INSTALL_HINT}")

    # ---------------------------------------------------------------- internals
    def config_text(self, port: int) -> str:
        if self.config_file is not None or self.given_config is not None:
            text = self.config_file.read_text() if self.config_file is not None else self.given_config
            return substitute_listener(text, port)
        s = self.settings
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if s.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"autosave_interval {s.autosave_interval_s}",
            f"autosave_on_changes {'true' if s.autosave_on_changes else 'false'}",
            f"max_inflight_messages {s.max_inflight_messages}",
            # The aggregator acknowledges a message only once its window is stored, so its TCP ACKs
            # are delayed (40 ms): with Nagle on, the broker then held back the next messages of a
            # window until that ACK came (assembly 46 ms instead of a few at 8 nodes, 1 window/s).
            "set_tcp_nodelay true",
            f"max_queued_messages {s.max_queued_messages}",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice",
            "connection_messages true",
        ]
        if s.message_size_limit:
            lines.append(f"message_size_limit {s.message_size_limit}")
        if os.geteuid() == 0:
            # Mosquitto run as root switches to user "mosquitto", who cannot write our temp dir.
            lines.append("user root")
        return "\n".join([*lines, *s.extra_lines]) + "\n"

    def _try_start(self, port: int) -> bool:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text(port))
        with open(self.workdir / "stderr.log", "ab") as err:  # config errors land here
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        return False


def substitute_listener(text: str, port: int) -> str:
    """A Mosquitto config with its one ``listener`` line bound to ``127.0.0.1:port`` instead.

    The listener's own options (TLS files...) follow that line and are kept. Tests must not listen
    beyond loopback; run as root, ``user`` becomes root, as for generated configs (Mosquitto would
    switch to a user that cannot read our temporary folders).
    """
    lines = text.splitlines()
    listeners = [i for i, line in enumerate(lines) if line.split()[:1] == ["listener"]]
    if len(listeners) != 1:
        raise TestbedError(f"a config to run needs exactly one listener line, found {len(listeners)}")
    lines[listeners[0]] = f"listener {port} 127.0.0.1"
    if os.geteuid() == 0:
        lines = [line for line in lines if line.split()[:1] != ["user"]] + ["user root"]
    return "\n".join(lines) + "\n"
