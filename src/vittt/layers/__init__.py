"""nn.Modules of TTT backbones: inner models, the TTT mixer, positional encodings, MLPs, stems, blocks."""
from .adaln import DiTBlock, FinalLayer, LabelEmbedder, TimestepEmbedder, modulate, sincos_2d
from .block import TTTBlock, cpe_residual, residual
from .conv import ConvDownsample, ConvNormAct, ConvStem, PatchEmbed
from .grid import GridSize, map_to_tokens, tokens_to_map
from .lean import DEFAULT_CHUNK_TOKENS, set_memory_lean
from .inner import DWConvInner, InnerModel, SwiGLUInner, TokenInner, record_inner_stats, resolve_scale
from .mlp import TokenMlp
from .rope import RoPE2d, rope_2d_angles
from .switches import SWITCHES, FastPathSettings, PerModule, fast_path, fast_path_settings, set_fast_path
from .ttt import TTTMixer, vit3_inner_models
from .vision_ttt import MERGE_RULES, SCAN_ORDERS, TTTInnerState, VisionTTTMixer

# torch.fx (timm's FX feature extraction / test_model_*_fx, torchvision's create_feature_extractor with timm's tracer
# arguments): the inner models, RoPE tables and Vision-TTT's scans are leaves (their shape arithmetic and caches run
# eagerly inside one graph node); everything around them (projections, norms, MLPs, convolutions) is traced
from timm.layers import register_notrace_module as _leaf

for _module in (InnerModel, RoPE2d, VisionTTTMixer):
    _leaf(_module)
del _leaf, _module
