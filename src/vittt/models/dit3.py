"""DiT³ (Han et al., CVPR 2026, Table 10) and its DiT baseline (Peebles & Xie 2023): class-conditional diffusion
transformers with adaLN-Zero blocks; DiT³ puts a CPE in front of each block and replaces attention by the ViT³ TTT
mixer. One class builds both, at any latent size and aspect ratio (the sin-cos table is computed per grid).

    x [B, C, H, W] -> patch embedding (p×p conv) + sin-cos table -> tokens [B, N, D]
    c = TimestepEmbedder(t) + LabelEmbedder(y)
    blocks: DiTBlock(x, c, grid)   ->   FinalLayer(x, c) [B, N, p·p·C_out]   ->   unpatchify [B, C_out, H, W]

``C_out = 2 C`` with learned σ (ε, then the variance interpolation value v). Generators are not timm classifiers,
so these models are created with :func:`create_dit`, not ``timm.create_model``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..layers import GridSize, PatchEmbed
from ..layers.adaln import DiTBlock, FinalLayer, LabelEmbedder, TimestepEmbedder, sincos_2d

__all__ = ['DiT3', 'create_dit', 'DIT_CONFIGS', 'dit_names', 'unpatchify', 'resolve_dit_name', 'dit_model_args']

#: size -> (hidden D, depth, heads)
_SIZES: Dict[str, Tuple[int, int, int]] = {'s': (384, 12, 6), 'b': (768, 12, 12), 'l': (1024, 24, 16),
                                           'xl': (1152, 28, 16)}
#: name -> constructor arguments
DIT_CONFIGS: Dict[str, dict] = {}
for _size, (_dim, _depth, _heads) in _SIZES.items():
    for _p in (2, 4, 8):
        DIT_CONFIGS[f'dit3_{_size}_{_p}'] = dict(embed_dim=_dim, depth=_depth, num_heads=_heads, patch_size=_p,
                                                 mixer='ttt', cpe=True)
        DIT_CONFIGS[f'dit_{_size}_{_p}'] = dict(embed_dim=_dim, depth=_depth, num_heads=_heads, patch_size=_p,
                                                mixer='attention', cpe=False)


def dit_names():
    return sorted(DIT_CONFIGS)


def resolve_dit_name(name: str) -> str:
    """``dit3_b_2`` or the official spelling ``DiTTT-B/2`` / ``DiT-B/2`` -> the registered name."""
    key = name.strip()
    for prefix, family in (('DiTTT-', 'dit3'), ('DiT-', 'dit')):
        if key.startswith(prefix) and '/' in key:
            size, patch = key[len(prefix):].split('/', 1)
            key = f'{family}_{size.lower()}_{patch}'
            break
    if key not in DIT_CONFIGS:
        import difflib
        close = difflib.get_close_matches(key, DIT_CONFIGS, n=3)
        raise ValueError(f'unknown DiT model {name!r}' + (f' (did you mean {" or ".join(close)}?)' if close else '')
                         + '; known: dit3_{s,b,l,xl}_{2,4,8} and dit_{s,b,l,xl}_{2,4,8}')
    return key


def unpatchify(x: torch.Tensor, grid_size: GridSize, patch_size: int, channels: int) -> torch.Tensor:
    """``[B, h·w, p·p·C]`` (each token read as ``(p_row, p_col, c)``) -> ``[B, C, h·p, w·p]``."""
    b = x.shape[0]
    h, w = grid_size
    p = patch_size
    x = x.reshape(b, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * p, w * p)


def _concrete(t: torch.Tensor) -> bool:
    """Whether ``t`` has values to check (not while tracing, compiling, or on fake / meta tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return not (isinstance(t, FakeTensor) or t.is_meta or torch.compiler.is_compiling()
                or torch.jit.is_tracing())


class DiT3(nn.Module):
    """DiT³ (``mixer='ttt', cpe=True``) or DiT (``mixer='attention', cpe=False``).

    Args:
        in_chans: latent (or pixel) channels C.
        patch_size: p; inputs must have sides divisible by p (no padding: a generator's output size is its input's).
        embed_dim, depth, num_heads, mlp_ratio: the transformer.
        num_classes: classes; with ``class_dropout_prob > 0`` index ``num_classes`` is the null class (CFG).
        learn_sigma: predict the variance interpolation v besides ε (``C_out = 2 C``).
        mixer, cpe: see above; ``dit_*:cpe=True`` isolates the CPE's share.
        pos_embed: ``'sincos'`` (the official fixed table, computed per grid) or None (no absolute position).
        pos_embed_base_grid: interpolate positions to this grid (diffusers / PixArt style) instead of extrapolating.
        ttt_kwargs: passed to the TTT mixer (inner loss, scale, ...).
    """

    def __init__(self, in_chans: int = 4, patch_size: int = 2, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1, learn_sigma: bool = True, mixer: str = 'ttt', cpe: bool = True,
                 pos_embed: Optional[str] = 'sincos', pos_embed_base_grid: Optional[GridSize] = None,
                 ttt_kwargs: Optional[dict] = None):
        super().__init__()
        if pos_embed not in ('sincos', None):
            raise ValueError(f"pos_embed must be 'sincos' or None, got {pos_embed!r}")
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})')
        self.in_chans, self.patch_size, self.embed_dim = in_chans, patch_size, embed_dim
        self.out_chans = 2 * in_chans if learn_sigma else in_chans
        self.learn_sigma, self.num_classes, self.class_dropout_prob = learn_sigma, num_classes, class_dropout_prob
        self.mixer, self.pos_embed_kind = mixer, pos_embed
        self.pos_embed_base_grid = tuple(pos_embed_base_grid) if pos_embed_base_grid else None
        self.x_embedder = PatchEmbed(in_chans, embed_dim, patch_size)
        self.t_embedder = TimestepEmbedder(embed_dim)
        self.y_embedder = LabelEmbedder(num_classes, embed_dim, class_dropout_prob)
        self.blocks = nn.ModuleList([DiTBlock(embed_dim, num_heads, mlp_ratio, mixer=mixer, cpe=cpe,
                                              ttt_kwargs=ttt_kwargs) for _ in range(depth)])
        self.final_layer = FinalLayer(embed_dim, patch_size, self.out_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official order: Xavier-uniform for every Linear (zero bias); patch conv Xavier on its flattened view;
        label table N(0, 0.02); timestep MLP weights N(0, 0.02); every adaLN and the final linear zero. The CPE
        keeps PyTorch's default and the TTT initial states their trunc_normal(0.02). The output is 0 at init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def pos_embed(self, grid_size: GridSize, device, dtype) -> Optional[torch.Tensor]:
        """The position table ``[1, h·w, D]`` of a grid (None without absolute positions)."""
        if self.pos_embed_kind is None:
            return None
        return sincos_2d(grid_size, self.embed_dim, self.pos_embed_base_grid).to(device=device, dtype=dtype)[None]

    def _check(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'expected inputs [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}')
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f'input sides must be multiples of the patch size {p}, got {h}×{w} (pad or crop the '
                             f'latents to {h - h % p or p}×{w - w % p or p} or {h + -h % p}×{w + -w % p})')
        b = x.shape[0]
        if t.shape != (b,) or y.shape != (b,):
            raise ValueError(f't and y must be [B] = [{b}], got {tuple(t.shape)} and {tuple(y.shape)}')
        if y.is_floating_point():
            raise ValueError('y holds class indices: an integer tensor')
        if y.numel() and _concrete(y):
            top = self.num_classes if self.class_dropout_prob > 0 else self.num_classes - 1
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi > top:
                null = (f'{self.num_classes} is the null class' if self.class_dropout_prob > 0
                        else 'no null class: class_dropout_prob is 0')
                raise ValueError(f'labels must be in [0, {top}] ({null}), got values in [{lo}, {hi}]')

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [B, C, H, W]``, timesteps ``t [B]`` (original 0..T-1 scale), labels ``y [B]`` -> ``[B, C_out, H, W]``.
        ``drop_mask`` (bool [B]): labels to replace by the null class (default in training: drawn with p = 0.1)."""
        self._check(x, t, y)
        tokens, grid_size = self.x_embedder(x)
        pos = self.pos_embed(grid_size, tokens.device, tokens.dtype)
        if pos is not None:
            tokens = tokens + pos
        c = self.t_embedder(t) + self.y_embedder(y, drop_mask if drop_mask is not None or not self.training
                                                 else None)
        for block in self.blocks:
            tokens = block(tokens, c, grid_size)
        out = self.final_layer(tokens, c)
        return unpatchify(out, grid_size, self.patch_size, self.out_chans)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: Optional[int] = None) -> torch.Tensor:
        """Classifier-free guidance on a doubled batch: the first half of ``x`` (used for both halves) with the
        labels of ``y``'s halves (conditional, then null). ``eps = eps_u + s (eps_c - eps_u)`` on the first
        ``guided_channels`` channels (default all ``in_chans`` noise channels; 3 reproduces the official quirk); the
        other channels keep the conditional half's values; both halves return the guided result."""
        if x.shape[0] % 2:
            raise ValueError(f'forward_with_cfg takes a doubled batch (conditional, then null rows), got {x.shape[0]}')
        guided = self.in_chans if guided_channels is None else guided_channels
        if not 1 <= guided <= self.in_chans:
            raise ValueError(f'guided_channels must be in [1, {self.in_chans}] (the noise channels), got {guided}')
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :guided], out[:, guided:]
        cond, uncond = eps.chunk(2)
        mixed = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([mixed, mixed]), rest], dim=1)


def dit_model_args(x: torch.Tensor) -> tuple:
    """``(x, t, y)`` for counting or benchmarking a DiT on latents ``x``: mid-range timesteps, class 0."""
    b = x.shape[0]
    return x, torch.full((b,), 500.0, device=x.device), torch.zeros(b, dtype=torch.long, device=x.device)


def create_dit(name: str, checkpoint=None, **overrides) -> DiT3:
    """``dit3_{s,b,l,xl}_{2,4,8}`` / ``dit_*`` (or ``DiTTT-B/2`` / ``DiT-B/2``) with constructor overrides, e.g.
    ``create_dit('dit3_b_2', in_chans=1, num_classes=10)``. ``checkpoint``: an official DiT³ / DiT file or a
    converted one, loaded strictly (:func:`vittt.models.official.load_dit_checkpoint`)."""
    config = dict(DIT_CONFIGS[resolve_dit_name(name)], **overrides)
    model = DiT3(**config)
    if checkpoint is not None:
        from .official import load_dit_checkpoint
        load_dit_checkpoint(model, checkpoint)
    return model
