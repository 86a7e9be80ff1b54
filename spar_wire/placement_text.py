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

Both caches are bounded, because descriptions come from births, which anyone who may publish a birth
can vary at will: a stream of distinct descriptions must not grow memory or disk forever. The
memory cache is an LRU of ``max_entries`` texts; the disk cache keeps at most ``max_files`` files
and evicts the least recently used (file mtime, refreshed on every disk hit; texts still in the
memory cache count as the most recent, since their hits never reach the disk). Eviction only ever
costs a later re-embedding, so a failed eviction is ignored. Several processes may share one cache
folder: each bounds it when it writes, so the bound holds within the writes of one eviction batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spar_wire.atomic_file import atomic_writer
from spar_wire.errors import WireError

TEXT_DIMS = 256
_CONFIG = "l2_supercat"
# A site has tens of nodes, each with one description at a time: 1024 covers every node of a large
# site through many moves, and costs ~1 MiB of vectors.
DEFAULT_MAX_ENTRIES = 1024
# ~1.2 KB per .npy (a 4 KiB block on most file systems): 4096 files stay under 20 MiB of disk.
DEFAULT_MAX_FILES = 4096


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
    """description strings -> [n, 256] float32 unit vectors (zeros for empty text), cached per text.

    ``max_entries``: texts kept in memory (LRU); ``max_files``: files kept under
    ``cache_dir/embeddings`` (least recently used evicted). Both at least 1.
    """

    def __init__(self, cache_dir: str | Path | None = None, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_files: int = DEFAULT_MAX_FILES):
        if max_entries < 1 or max_files < 1:
            raise ValueError(f"max_entries and max_files must be at least 1, got {max_entries}, {max_files}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.model_id = text_model_id()
        self.max_entries = max_entries
        self.max_files = max_files
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()  # least recently used first
        self._model = None
        self.computed = 0  # texts embedded by the model (not served from a cache)
        self.evicted_files = 0  # disk files this encoder removed to keep the bound
        self._files_written = 0  # since the last eviction scan; the scan runs when it could be over
        self._files_known: int | None = None  # files found by the last scan (None: not scanned yet)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[n] descriptions -> [n, TEXT_DIMS] float32; identical texts give identical rows."""
        texts = [_clean(t) for t in texts]
        # The rows of this call are collected here, not read back from the memory cache: one call
        # may hold more distinct texts than the cache keeps.
        found: dict[str, np.ndarray] = {}
        missing = []
        for text in dict.fromkeys(texts):
            vector = self._from_memory(text)
            if vector is None:
                vector = self._from_disk(text)
            if vector is None:
                missing.append(text)
            else:
                found[text] = vector
        if missing:
            for text, vector in zip(missing, self._compute(missing), strict=True):
                found[text] = vector
                self._remember(text, vector)
                self._to_disk(text, vector)
        if not texts:
            return np.zeros((0, TEXT_DIMS), dtype=np.float32)
        return np.stack([found[t] for t in texts])

    def warm(self) -> None:
        """Load the model now: a service calls this at start, so the first unseen description (a
        node joining live) does not pay for it, or fail, on the data path."""
        self._load()

    def cached_texts(self) -> list[str]:
        """Texts in the memory cache, least recently used first."""
        return list(self._memory)

    def _from_memory(self, text: str) -> np.ndarray | None:
        vector = self._memory.get(text)
        if vector is not None:
            self._memory.move_to_end(text)
        return vector

    def _remember(self, text: str, vector: np.ndarray) -> None:
        self._memory[text] = vector
        self._memory.move_to_end(text)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

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

    def _disk_name(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_id}\n{text}".encode()).hexdigest() + ".npy"

    def _disk_path(self, text: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "embeddings" / self._disk_name(text)

    def _from_disk(self, text: str) -> np.ndarray | None:
        path = self._disk_path(text)
        if path is None or not path.exists():
            return None
        try:
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a torn or foreign file: embed again and overwrite it
        if vector.shape != (TEXT_DIMS,) or vector.dtype != np.float32:
            return None
        with contextlib.suppress(OSError):  # a read-only cache still serves; it just ages
            os.utime(path)  # the disk LRU's "recently used": mtime
        self._remember(text, vector)
        return vector

    def _to_disk(self, text: str, vector: np.ndarray) -> None:
        path = self._disk_path(text)
        if path is None:
            return
        try:
            # write-then-rename: a reader never sees half a file. A failed write removes its temporary
            # file (a full or failing disk must not also collect our temp files). Mode 0644: the cache
            # may be shared by processes of other users. No fsync: a vector lost in a power cut is only
            # embedded again, and a birth storm must not wait on the disk.
            with atomic_writer(path, mode=0o644, durable=False) as handle:
                np.save(handle, vector, allow_pickle=False)
        except OSError:
            return  # the disk cache only saves time; the memory cache still holds the vector
        self._files_written += 1
        if self._files_known is None or self._files_known + self._files_written > self.max_files:
            self._evict_files(path.parent)

    def _evict_files(self, folder: Path) -> None:
        """Bring ``folder`` down to ``max_files`` files, least recently used first; never raises.

        It goes a tenth below the bound, so that a stream of new texts scans the folder once per
        ``max_files / 10`` writes, not on every write."""
        self._files_written = 0
        try:
            entries = [(e.stat().st_mtime_ns, e.name) for e in os.scandir(folder)
                       if e.name.endswith(".npy") and e.is_file()]
        except OSError:
            self._files_known = None  # try again on the next write
            return
        if len(entries) <= self.max_files:
            self._files_known = len(entries)
            return
        # Texts in memory are in use, but their hits never touch the disk: rank them newest, in
        # their LRU order, so a hot description keeps its file however old its mtime is.
        rank = {self._disk_name(t): i for i, t in enumerate(self._memory)}
        entries.sort(key=lambda e: (e[1] in rank, rank.get(e[1], 0), e[0], e[1]))
        keep = max(1, self.max_files - self.max_files // 10)
        removed = 0
        for _, name in entries[:len(entries) - keep]:
            try:
                (folder / name).unlink()
                removed += 1
            except OSError:
                pass  # gone already (another process), or not ours to remove: the next scan retries
        self.evicted_files += removed
        self._files_known = len(entries) - removed


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
        # copy-then-rename: processes starting together (DDP ranks, benchmark jobs) never read half a file;
        # 0644: another user's process may share this cache folder
        with (open(package / "tokenizers" / tokenizer.name, "rb") as source,
              atomic_writer(tokenizer, mode=0o644) as handle):
            shutil.copyfileobj(source, handle)
    try:
        return WordLlama.load(config=_CONFIG, dim=TEXT_DIMS, cache_dir=home, disable_download=True)
    except (FileNotFoundError, ValueError) as exc:
        raise WireError("text_encoder_unavailable", f"cannot load WordLlama offline: {exc}") from None
