"""``spar-aggregator run`` as a child process: started, stopped (SIGTERM), killed (SIGKILL), started again.

Fault trials kill and restart it; the fuzzer measures its memory and reads its counters. It runs
exactly as in the field, from a config file, its output appended to one log across restarts, its
Prometheus endpoint on a free port.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from testbed.errors import TestbedError
from testbed.local_broker import die_with_parent

REPO = Path(__file__).resolve().parents[1]
_READY = re.compile(r"aggregator running: .*metrics port (\d+)")
_STOPPED = re.compile(r"^stopped: .*; messages (\{.*\})$", re.MULTILINE)


class AggregatorProcess:
    def __init__(self, config: Path, log_path: Path, *, ready_timeout_s: float = 90.0,
                 entry: Sequence[str] = ("-m", "edge_runtime.cli")):
        """``entry``: what runs after the Python interpreter, before ``run --config ...``: the real
        ``spar-aggregator`` by default; the fault trial's held-commit wrapper
        (``testbed/held_commit_aggregator.py``) takes the same arguments."""
        self.config = Path(config)
        self.entry = tuple(entry)
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.metrics_url = ""
        self.starts = 0

    def start(self) -> float:
        """Start a process and wait until it serves; the seconds that took. TestbedError (with this
        start's log) when it exits or is not serving within ``ready_timeout_s``."""
        begun = time.monotonic()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = [sys.executable, *self.entry, "run", "--config", str(self.config), "--metrics-port", "0"]
        with open(self.log_path, "ab") as log:
            # die_with_parent: a killed benchmark must not leave an aggregator behind.
            self.proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.starts += 1
        while time.monotonic() - begun < self.ready_timeout_s:
            match = _READY.search(self.log_text(offset))
            if match:
                self.metrics_url = f"http://127.0.0.1:{match.group(1)}/metrics"
                return time.monotonic() - begun
            if self.proc.poll() is not None:
                raise TestbedError(f"the aggregator exited with {self.proc.returncode}; log:\n"
                                 f"{self.log_text(offset)[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise TestbedError(f"the aggregator did not start within {self.ready_timeout_s:.0f} s; log:\n"
                         f"{self.log_text(offset)[-3000:]}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (drain) and wait: the exit code, or None when it had to be killed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL if still running: no drain, as when power is cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def pid(self) -> int:
        """The current process id (-1 before start)."""
        return self.proc.pid if self.proc else -1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, offset: int = 0) -> str:
        """What it wrote to stdout and stderr, from byte ``offset`` of the log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def metrics_text(self, timeout_s: float = 5.0) -> str | None:
        """The Prometheus text of the running process; None when it does not answer."""
        if not self.metrics_url:
            return None
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as response:
                return response.read().decode()
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def final_counts(self) -> dict[str, int]:
        """The message counters the last process printed on its way out ("stopped: ... messages {...}")."""
        matches = _STOPPED.findall(self.log_text())
        if not matches:
            return {}
        try:
            return dict(ast.literal_eval(matches[-1]))
        except (ValueError, SyntaxError):
            return {}
