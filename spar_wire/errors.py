"""The one error type of the wire contract."""

from __future__ import annotations


class WireError(ValueError):
    """Anything wrong with wire input: a message, a topic, a layout, a feature config.

    ``reason`` is a short, stable, machine-readable code (``"bad_crc"``, ``"truncated"``, ...)
    that services use as a counter label; the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message
