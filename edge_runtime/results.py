"""The JSON result of one window, as published on ``aggregator/results`` and stored in SQLite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.window_assembler import AssembledWindow
from spar_wire.model_manifest import POSITIONS_INPUT, ModelManifest


@dataclass(frozen=True)
class Timing:
    """Seconds spent per stage for one window (monotonic clock)."""

    assembly_s: float  # first message arrived -> window closed
    queue_s: float  # window closed -> inference started
    inference_s: float  # the backend call (shared by a batch)
    end_to_end_s: float | None  # window end on the node clock -> result ready (wall clock)


def build_result(site: str, window: AssembledWindow, outputs: dict[str, np.ndarray],
                 manifest: ModelManifest, timing: Timing, batch_size: int) -> dict[str, Any]:
    """One window's result. ``outputs``: the backend outputs of this window (no batch axis)."""
    result: dict[str, Any] = {
        "site": site,
        "window_start_ns": window.window_start_ns,
        "window_index": window.window_index,
        "grid_start_ns": window.grid_start_ns,  # the window's identity on the site's grid
        "model": f"{manifest.name}@{manifest.version}",
        "task": manifest.task,
        "nodes": list(window.node_ids),
        # [N, d_S] metres, the positions the placement tensor used (a moved node's new place, a
        # joined node's birth position): what the result means depends on them
        "positions": np.asarray(window.inputs.get(POSITIONS_INPUT, np.zeros((0, 0)))).round(4).tolist(),
        "nodes_present": window.nodes_present,
        "present": {m: list(nodes) for m, nodes in window.present.items()},
        "complete": window.complete,
        "closed_by": window.reason,
        "outputs": {name: np.asarray(value).tolist() for name, value in outputs.items()},
        "batch_size": batch_size,
        "latency_ms": {
            "assembly": round(timing.assembly_s * 1e3, 3),
            "queue": round(timing.queue_s * 1e3, 3),
            "inference": round(timing.inference_s * 1e3, 3),
            "end_to_end": None if timing.end_to_end_s is None else round(timing.end_to_end_s * 1e3, 3),
        },
    }
    for spec in manifest.outputs:
        if spec.kind == "class_logits" and spec.name in outputs:
            probabilities = _softmax(np.asarray(outputs[spec.name], dtype=np.float64))
            names = list(manifest.class_names) or [str(i) for i in range(len(probabilities))]
            best = int(np.argmax(probabilities))
            result["class_probabilities"] = {names[i]: round(float(p), 6) for i, p in enumerate(probabilities)}
            result["class"] = names[best]
            result["class_index"] = best
            break
    return result


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()
