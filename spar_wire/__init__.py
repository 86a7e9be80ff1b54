"""spar_wire: the contract every spar-edge unit shares (torch-free; numpy, scipy, pillow).

Site layouts, feature configs and extraction, uint8 quantization, codecs, token-message framing,
birth/state payloads and topic names. Everything that reads outside input raises ``WireError``.
"""

from spar_wire.codecs import CODECS, CodecSpec
from spar_wire.errors import WireError
from spar_wire.feature_config import PRESETS, FeatureConfig, feature_preset
from spar_wire.features import compute_token_image, extract_tokens, patch_positions, patchify, unpatchify
from spar_wire.lifecycle import BirthMessage, ModalityInfo, StateMessage, parse_birth, parse_state
from spar_wire.message import TokenMessage, WireLimits, decode_message, encode_message, make_message
from spar_wire.quantization import dequantize, quantize
from spar_wire.site_layout import ModalitySpec, NodeSpec, SiteLayout, load_site_layout, parse_site_layout
from spar_wire.topics import Topic, parse_topic

__all__ = [
    "CODECS", "PRESETS", "BirthMessage", "CodecSpec", "FeatureConfig", "ModalityInfo",
    "ModalitySpec", "NodeSpec", "SiteLayout", "StateMessage", "Topic", "TokenMessage",
    "WireError", "WireLimits", "compute_token_image", "decode_message", "dequantize",
    "encode_message", "extract_tokens", "feature_preset", "load_site_layout", "make_message",
    "parse_birth", "parse_site_layout", "parse_state", "parse_topic", "patch_positions",
    "patchify", "quantize", "unpatchify",
]
