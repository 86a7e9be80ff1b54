"""Model configuration: one dataclass, saved inside every checkpoint so it rebuilds its model alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from train.models.masking import STRATEGIES

STRUCTURAL_SOURCES = ("table", "text")


@dataclass(frozen=True)
class ModalitySpec:
    """Token layout of one modality, as the site's feature config produces it."""

    name: str
    n_tokens: int  # m: patches per node per window
    token_dim: int  # D: values per patch
    # (rows, cols) of the token grid: frequency (or subcarrier) patches x time patches; tokens are
    # row-major (spar_wire.features.patchify). None when unknown: read as one row of m time patches.
    patch_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.patch_grid is not None:
            grid = tuple(int(v) for v in self.patch_grid)
            if len(grid) != 2 or grid[0] * grid[1] != self.n_tokens:
                raise ValueError(f"modality {self.name}: patch_grid {self.patch_grid} does not hold "
                                 f"{self.n_tokens} tokens")
            object.__setattr__(self, "patch_grid", grid)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the token grid; (1, m) when the dataset did not say."""
        return self.patch_grid if self.patch_grid is not None else (1, self.n_tokens)


@dataclass(frozen=True)
class SparConfig:
    modalities: tuple[ModalitySpec, ...]
    max_nodes: int = 16  # rows of the structural-position table (node_index must stay below)
    position_dims: int = 2  # d_S: 2 for lots, 3 for seismic stations
    dim: int = 64  # d: transformer width
    heads: int = 4
    mlp_ratio: float = 2.0
    modality_depth: int = 2  # blocks of each per-modality encoder
    joint_depth: int = 1  # blocks of the joint (cross-modal) encoder
    decoder_dim: int = 48
    decoder_depth: int = 1
    structural_dims: int = 8  # d_R << d (the paper keeps it small)
    # k consecutive tokens of a node (row-major: adjacent time patches of one band) embedded as one
    # coarser token: every encoder then sees N * m / k tokens per modality, so attention costs k^2
    # less. A distilled-student setting (export.distill); pretraining and fine-tuning keep 1.
    token_merge: int = 1
    # --- SPAR components, each switchable for the ablations of the paper's Table 8
    spatial_embedding: bool = True  # add a projection of the normalised node position
    structural_embedding: bool = True  # add a learnable per-node vector projected to d
    # Where the structural vector comes from: "table" (a learnable row per node slot, SPAR) or
    # "text" (a frozen embedding of the node's placement description, SPAR+LLM; batch.node_text).
    structural_source: str = "table"
    text_dims: int = 256  # E: width of the description embeddings (spar_wire.placement_text)
    spatial_reconstruction: bool = True  # second decoder reconstructs masked tokens' positions
    geometric_augmentation: bool = True  # random rotation + translation of the layout (pretraining)
    masking: str = "random"  # random | node_balanced | node_drop
    mask_ratio: float = 0.75
    min_visible: int = 2  # node_balanced: visible tokens guaranteed per present node
    spatial_loss_weight: float = 1.0
    max_translation: float = 0.5  # geometric augmentation, normalised units
    objective: str = "spar"  # what trained it: spar | mae | robusthar | aemp | supervised | an ablation
    # Hyperparameters of the objective's own losses and masking (RobustHAR's lambda, AEMP's span
    # parameter, ...), validated by the objective's params dataclass (train.objectives).
    objective_params: dict[str, Any] = field(default_factory=dict, compare=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("a model needs at least one modality")
        if self.masking not in STRATEGIES:
            raise ValueError(f"masking must be one of {', '.join(STRATEGIES)}, got {self.masking!r}")
        if self.structural_source not in STRUCTURAL_SOURCES:
            raise ValueError(f"structural_source must be one of {', '.join(STRUCTURAL_SOURCES)}, "
                             f"got {self.structural_source!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for name in ("dim", "heads", "decoder_dim", "max_nodes", "position_dims", "structural_dims", "text_dims"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.token_merge, int) or self.token_merge < 1:
            raise ValueError(f"token_merge must be an integer >= 1, got {self.token_merge!r}")
        for spec in self.modalities:
            if spec.n_tokens % self.token_merge:
                raise ValueError(f"token_merge {self.token_merge} does not divide the {spec.n_tokens} tokens of "
                                 f"modality {spec.name}")
        if self.dim % self.heads or self.decoder_dim % self.heads:
            raise ValueError(f"dim ({self.dim}) and decoder_dim ({self.decoder_dim}) must be divisible by "
                             f"heads ({self.heads})")

    def modality(self, name: str) -> ModalitySpec:
        for spec in self.modalities:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        data = dict(data)
        data["modalities"] = tuple(ModalitySpec(**m) for m in data["modalities"])
        return cls(**data)


# Pretraining objectives as switches over the one backbone. MAE is the paper's baseline: signal
# reconstruction only, with no spatial or structural embedding (so nothing tells nodes apart).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "spar": {},
    # SPAR+LLM: structural positions from text descriptions of each node's placement.
    "spar_llm": {"structural_source": "text"},
    "mae": {"spatial_embedding": False, "structural_embedding": False, "spatial_reconstruction": False,
            "geometric_augmentation": False},
    # The alternative objectives keep the placement-aware backbone (spatial + structural
    # embeddings: RobustHAR's "location-inspired" modelling, AEMP's AP identities) but bring their
    # own masking and losses instead of SPAR's spatial decoder and rigid-motion augmentation.
    "robusthar": {"spatial_reconstruction": False, "geometric_augmentation": False},
    "aemp": {"spatial_reconstruction": False, "geometric_augmentation": False},
    "supervised": {},  # labels train the encoder: no masking, no decoders
}

# Table 8 of the paper, as switches on top of SPAR.
ABLATIONS: dict[str, dict[str, Any]] = {
    "no_geometric_augmentation": {"geometric_augmentation": False},
    "no_spatial_reconstruction": {"spatial_reconstruction": False},
    "no_spatial_embedding": {"spatial_embedding": False},
    "no_structural_embedding": {"structural_embedding": False},
    "node_balanced_masking": {"masking": "node_balanced"},
    "node_drop_masking": {"masking": "node_drop"},
    "mask_ratio_0.5": {"mask_ratio": 0.5},
    "mask_ratio_0.85": {"mask_ratio": 0.85},
}


def objective_config(base: SparConfig, objective: str) -> SparConfig:
    """``base`` with the switches of a named objective (or ablation) applied."""
    table = {**OBJECTIVES, **ABLATIONS}
    if objective not in table:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(table)}")
    return replace(base, objective=objective, **table[objective])
