"""Layer-wise fine-tuning (AEMP section 5 and appendix A.7): the head trains alone first, then the
encoder is unfrozen from the top layer down, each layer with a learning rate that decays with depth.

Layers, top to bottom (index 0 first): the head; the joint blocks, last first (the joint stack's
final norm goes with its last block); the per-modality blocks by depth, last first, every
modality's block of that depth together (they sit at the same depth of the network, and a
modality stack's final norm goes with its last block); the embeddings of every modality.

The paper's recipe (100 epochs): head only for 20 epochs, then everything, the last encoder layer
at 5e-5 and the lower ones at 1e-5. Here: ``unfrozen_depth(epoch, n_layers, freeze_epochs=20,
epochs_per_layer=0)`` (0: all at once, as the paper; k > 0: one more layer every k epochs), and
``layerwise_param_groups(encoder, head, base_lr, decay)``: layer i at base_lr * decay ** i.
"""

from __future__ import annotations

from torch import nn

from train.models.spar import SparEncoder


def encoder_layers(encoder: SparEncoder, head: nn.Module | None = None) -> list[list[nn.Parameter]]:
    """Parameters per layer, top to bottom (``head`` first when given); every parameter of the
    encoder (and head) exactly once; layers without parameters are left out."""
    layers: list[list[nn.Parameter]] = []
    if head is not None:
        layers.append(list(head.parameters()))
    layers.extend(_stack_layers([encoder.joint]))
    layers.extend(_stack_layers(list(encoder.encoders.values())))
    layers.append(list(encoder.embeddings.parameters()))
    return [layer for layer in layers if layer]


def _stack_layers(stacks: list[nn.Module]) -> list[list[nn.Parameter]]:
    """Blocks of parallel ``Stack``s by depth, last first; each stack's final norm joins its last block."""
    depth = max((len(s.blocks) for s in stacks), default=0)
    layers = [[] for _ in range(depth)]
    for stack in stacks:
        for i, block in enumerate(stack.blocks):
            layers[depth - len(stack.blocks) + i].extend(block.parameters())
        if len(stack.blocks):
            layers[-1].extend(stack.norm.parameters())
    return layers[::-1]


def layerwise_param_groups(encoder: SparEncoder, head: nn.Module, base_lr: float, decay: float,
                           weight_decay: float | None = None) -> list[dict]:
    """Optimizer param groups, one per layer of ``encoder_layers(encoder, head)``: layer i (0 = head)
    gets lr = base_lr * decay ** i. Each group also records "layer" and "lr_scale" = decay ** i, so
    a schedule can set ``group["lr"] = lr_now * group["lr_scale"]``. Frozen parameters stay in
    their groups (AdamW skips parameters without a gradient), so unfreezing needs no new optimizer."""
    if base_lr <= 0 or not 0 < decay <= 1:
        raise ValueError(f"need base_lr > 0 and decay in (0, 1], got {base_lr}, {decay}")
    groups = []
    for i, params in enumerate(encoder_layers(encoder, head)):
        group = {"params": params, "lr": base_lr * decay ** i, "lr_scale": decay ** i, "layer": i}
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups


def unfrozen_depth(epoch: int, n_layers: int, freeze_epochs: int = 20, epochs_per_layer: int = 0) -> int:
    """How many layers from the top train at ``epoch`` (0-based): 1 (the head) for the first
    ``freeze_epochs``, then all (epochs_per_layer 0, the paper) or one more layer every
    ``epochs_per_layer`` epochs, starting with the top encoder layer at epoch ``freeze_epochs``."""
    if n_layers < 1 or freeze_epochs < 0 or epochs_per_layer < 0:
        raise ValueError("need n_layers >= 1, freeze_epochs >= 0, epochs_per_layer >= 0")
    if epoch < freeze_epochs:
        return 1
    if epochs_per_layer == 0:
        return n_layers
    return min(n_layers, 2 + (epoch - freeze_epochs) // epochs_per_layer)


def apply_unfreezing(layers: list[list[nn.Parameter]], depth: int) -> None:
    """requires_grad True for the top ``depth`` layers, False below."""
    for i, params in enumerate(layers):
        for p in params:
            p.requires_grad_(i < depth)
