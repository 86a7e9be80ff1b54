"""Text embeddings of node placement descriptions, for SPAR+LLM structural positions.

SPAR+LLM replaces the learnable per-node structural vector with an embedding of a free-text
description of the node's placement ("left shin, halfway between knee and ankle"), so a node the
model never saw still gets a meaningful structural position from its birth message.

The encoder is WordLlama (``wordllama`` on PyPI, l2_supercat, 256 dims): token embeddings distilled
from an LLM's embedding table, mean-pooled. Its weights and tokenizer ship inside the wheel, so it
runs offline, and it needs only numpy + tokenizers: the aggregator embeds descriptions itself with
no torch and no ONNX graph of its own. The frozen text vector is an input of the deployed graph
(``node_text``); the learned projection to the model width is inside the graph. We checked the
MiniLM-class alternatives on PyPI: sentence-transformers, fastembed and model2vec all download
their weights from the Hugging Face Hub on first use, which a field box cannot do.

Embeddings are L2-normalised (a description's length must not change its weight) and cached per
text: in memory always, and on disk under ``cache_dir/embeddings`` when a cache folder is given, so
an aggregator restart does not embed its nodes again. An empty description embeds to zeros (the
projection then adds nothing: "placement unknown").
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spar_wire.errors import WireError

TEXT_DIMS = 256
_CONFIG = "l2_supercat"


def text_model_id() -> str:
    """Name and version of the text encoder; recorded in checkpoints and model manifests so that a
    model is never fed embeddings from another encoder version."""
    try:
        version = importlib.metadata.version("wordllama")
    except importlib.metadata.PackageNotFoundError:
        version = "missing"
    return f"wordllama-{_CONFIG}-{TEXT_DIMS}/{version}"


def default_cache_dir() -> Path:
    """``$SPAR_TEXT_CACHE``, else ``~/.cache/spar-edge/placement-text``."""
    return Path(os.environ.get("SPAR_TEXT_CACHE") or Path.home() / ".cache" / "spar-edge" / "placement-text")


class PlacementTextEncoder:
    """description strings -> [n, 256] float32 unit vectors (zeros for empty text), cached per text."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.model_id = text_model_id()
        self._memory: dict[str, np.ndarray] = {}
        self._model = None
        self.computed = 0  # texts embedded by the model (not served from a cache)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[n] descriptions -> [n, TEXT_DIMS] float32; identical texts give identical rows."""
        texts = [_clean(t) for t in texts]
        missing = [t for t in dict.fromkeys(texts) if t not in self._memory and not self._from_disk(t)]
        if missing:
            for text, vector in zip(missing, self._compute(missing), strict=True):
                self._memory[text] = vector
                self._to_disk(text, vector)
        if not texts:
            return np.zeros((0, TEXT_DIMS), dtype=np.float32)
        return np.stack([self._memory[t] for t in texts])

    def warm(self) -> None:
        """Load the model now: a service calls this at start, so the first unseen description (a
        node joining live) does not pay for it, or fail, on the data path."""
        self._load()

    def _compute(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        raw = np.asarray(model.embed(texts), dtype=np.float32).reshape(len(texts), TEXT_DIMS)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        self.computed += len(texts)
        return np.where(norms > 0, raw / np.maximum(norms, 1e-12), 0.0).astype(np.float32)

    def _load(self):
        if self._model is None:
            self._model = _load_wordllama()
        return self._model

    def _disk_path(self, text: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{self.model_id}\n{text}".encode()).hexdigest()
        return self.cache_dir / "embeddings" / f"{key}.npy"

    def _from_disk(self, text: str) -> bool:
        path = self._disk_path(text)
        if path is None or not path.exists():
            return False
        try:
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return False  # a torn or foreign file: embed again and overwrite it
        if vector.shape != (TEXT_DIMS,) or vector.dtype != np.float32:
            return False
        self._memory[text] = vector
        return True

    def _to_disk(self, text: str, vector: np.ndarray) -> None:
        path = self._disk_path(text)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # write-then-rename: a reader never sees half a file
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
                np.save(tmp, vector, allow_pickle=False)
            os.replace(tmp.name, path)
        except OSError:
            pass  # the disk cache only saves time; the memory cache still holds the vector


def _clean(text: str) -> str:
    if not isinstance(text, str):
        raise WireError("bad_description", f"a placement description must be text, got {type(text).__name__}")
    return " ".join(text.split())


def _load_wordllama():
    """WordLlama from the files inside its wheel, never from the network.

    wordllama 0.4 looks for its packaged tokenizer in a folder the wheel does not use, so the
    tokenizer config is copied into a private folder, and downloads are disabled."""
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError:
        raise WireError("text_encoder_unavailable", "SPAR+LLM needs the 'wordllama' package "
                        "(pip install wordllama); it ships its weights and runs offline") from None
    package = Path(wordllama.__file__).parent
    home = default_cache_dir() / "wordllama"
    tokenizer = home / "tokenizers" / f"{_CONFIG}_tokenizer_config.json"
    if not tokenizer.exists():
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        # copy-then-rename: processes starting together (DDP ranks, benchmark jobs) never read half a file
        with (open(package / "tokenizers" / tokenizer.name, "rb") as source,
              tempfile.NamedTemporaryFile(dir=tokenizer.parent, suffix=".tmp", delete=False) as tmp):
            shutil.copyfileobj(source, tmp)
        os.replace(tmp.name, tokenizer)
    try:
        return WordLlama.load(config=_CONFIG, dim=TEXT_DIMS, cache_dir=home, disable_download=True)
    except (FileNotFoundError, ValueError) as exc:
        raise WireError("text_encoder_unavailable", f"cannot load WordLlama offline: {exc}") from None
