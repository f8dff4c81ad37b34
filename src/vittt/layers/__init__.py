"""nn.Modules of TTT backbones: inner models, the TTT mixer, positional encodings, MLPs, stems, blocks."""
from .adaln import DiTBlock, FinalLayer, LabelEmbedder, TimestepEmbedder, modulate, sincos_2d
from .block import TTTBlock, cpe_residual
from .conv import ConvDownsample, ConvNormAct, ConvStem, PatchEmbed
from .grid import GridSize, map_to_tokens, tokens_to_map
from .lean import DEFAULT_CHUNK_TOKENS, set_memory_lean
from .inner import DWConvInner, InnerModel, SwiGLUInner, TokenInner, record_inner_stats, resolve_scale
from .mlp import TokenMlp
from .rope import RoPE2d, rope_2d_angles
from .switches import SWITCHES, FastPathSettings, PerModule, fast_path, fast_path_settings, set_fast_path
from .ttt import TTTMixer, vit3_inner_models
from .vision_ttt import MERGE_RULES, SCAN_ORDERS, TTTInnerState, VisionTTTMixer
