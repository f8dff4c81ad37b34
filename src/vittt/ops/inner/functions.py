"""Every inner model of the design space as three pieces: the closed-form gradient of the inner loss, the step, and
applying the model to the queries (spec ``vit3.md`` A.2, A.6).

An :class:`InnerFunction` is the math of one inner model family, stateless. Its state is a dict of tensors, each
``[S, h, a, b]`` (``S = 1``: the learned initial state W0 shared by all samples; ``S = B``: per sample, after a step).
Tokens are ``[B, h, N, d]`` (h heads of width d); :meth:`InnerFunction.features` may first turn them into the model's
input features (the 3×3 neighbourhoods of a convolution). With ``x`` the features of the keys, ``E = dL/dV_hat``:

=============== ============================================== ====================================================
name            F(x)                                           closed-form gradient (per sample and head)
=============== ============================================== ====================================================
``fc``          ``x W``                                        ``G = xᵀ E``
``silu_fc``     ``SiLU(x W)``                                  ``G = xᵀ (E ⊙ SiLU'(Z))``, ``Z = x W``
``mlp``         ``SiLU(x W1) W2`` (depth 2) or                 back-propagation layer by layer:
                ``SiLU(SiLU(x W1) W2) W3`` (depth 3)            ``G_L = a_(L-1)ᵀ E``, ``δ = (E W_Lᵀ) ⊙ SiLU'(Z)``, ...
``swiglu``      ``((x W1) ⊙ SiLU(x W2)) W3``                   ``G3 = Hᵀ E``, ``δ = E W3ᵀ``,
                                                               ``G1 = xᵀ (δ ⊙ SiLU(Z2))``,
                                                               ``G2 = xᵀ (δ ⊙ Z1 ⊙ SiLU'(Z2))``
``glu``         ``(x W1) ⊙ SiLU(x W2)`` (ViT³'s choice)         :mod:`vittt.ops.glu` (``[W1 | W2]`` as one matrix)
``conv3x3``     a full 3×3 conv per head = ``fc`` on the 3×3     as ``fc`` (Remark 6: the dataset is the pairs
                neighbourhoods of each token (``9d → d``)       (K's neighbourhood, V))
``dwconv3x3``   a depth-wise 3×3 conv over all heads' channels  :mod:`vittt.ops.dwconv`
``ttt_linear``  ``x + LN(x W + b)`` (Vision-TTT, Sun et al.)     ``dZ = LN'ᵀ E``, ``G_W = xᵀ dZ``, ``G_b = Σ dZ``
``ttt_mlp``     ``x + LN(GELU(x W1 + b1) W2 + b2)``, ratio 4     as ``ttt_linear``, then back through the GELU layer
=============== ============================================== ====================================================

The two TTT models' LayerNorm affine ``ln_weight, ln_bias`` is learned by the outer loop only: it is part of the state
(:attr:`InnerFunction.fixed`) but never stepped. With the MSE loss of scale 1, token weights ``η_j`` and no gradient
normalisation, their mini-batch training is Vision-TTT's non-causal mini-batch TTT (:mod:`vittt.ops.scan`).

``mlp`` takes a residual (Table 6): ``'add'`` (``F(x) + x``), ``'identity_w2'`` (the last weight used as ``W + I``);
``'init_identity'`` only changes the initial state (see :func:`init_state`). A widening ``ratio`` r gives the hidden
layers ``r · d`` units (``mlp``, ``swiglu``). Each gradient piece costs one matmul per weight or back-propagated
layer; with a loss that does not need the prediction (the dot product), the last layer's forward on the keys is
skipped, which is where the paper's MAC counts come from (a 2-layer MLP: 1 key forward + 3 gradient + 2 query
matmuls of d × d = 6 d² per token and head).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..dwconv import dwconv_inner_grad, dwconv_per_sample
from ..glu import swiglu_inner_grads
from ..loss import InnerLoss

__all__ = ['InnerFunction', 'FC', 'SiLUFC', 'MLP', 'SwiGLU', 'GLU', 'Conv3x3', 'DWConv', 'TTTLinear', 'TTTMLP',
           'INNER_FUNCTIONS', 'make_inner_function', 'silu_grad', 'gelu_grad', 'layer_norm', 'layer_norm_backward',
           'layer_norm_stats', 'layer_norm_project']

State = Dict[str, torch.Tensor]
GridSize = Tuple[int, int]


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    """``SiLU'(z) = σ(z) (1 + z (1 - σ(z)))``."""
    sig = torch.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


def _weighted(e: torch.Tensor, token_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """``E`` with each token's row scaled by its weight (``token_weights [B, h, N]``: the dynamic inner lr)."""
    return e if token_weights is None else e * token_weights.unsqueeze(-1)


class InnerFunction:
    """The math of one inner model: ``shapes`` of its state, ``features``, the forward split into ``hidden`` (what the
    gradient needs) and ``output``, the closed-form ``backward`` of ``E``; :meth:`grads` and :meth:`apply` compose them.

    Attributes:
        name: the switch value (``inner_model=``).
        token_wise: the model maps each token on its own (after :meth:`features`), so gradients of token subsets add
            up and mini-batches are token slices; False for ``dwconv3x3``, which works on the whole map.
        norm_dims: per state tensor, the dims its gradient is soft-normalised over (column-wise: ``-2``).
    """

    name: str = ''
    token_wise: bool = True
    #: state tensors the inner step leaves alone (learned by the outer loop only)
    fixed: Tuple[str, ...] = ()

    def __init__(self, dim: int, ratio: int = 1):
        self.dim, self.ratio = int(dim), int(ratio)

    # --- the pieces a subclass defines
    def shapes(self) -> Dict[str, Tuple[int, int]]:
        """``{name: (rows, cols)}`` of each per-head state tensor."""
        raise NotImplementedError

    def state_shapes(self, heads: int) -> Dict[str, Tuple[int, ...]]:
        """``{name: shape}`` of the initial state W0 of ``heads`` heads, ``[1, h, rows, cols]``."""
        return {name: (1, heads, *shape) for name, shape in self.shapes().items()}

    @property
    def norm_dims(self) -> Dict[str, Sequence[int]]:
        return {name: -2 for name in self.shapes()}

    @property
    def out_dim(self) -> int:
        return self.dim

    def features(self, x: torch.Tensor, grid_size: Optional[GridSize]) -> torch.Tensor:
        """Tokens ``[B, h, N, d]`` -> the model's input features (identity except for ``conv3x3``)."""
        return x

    def values(self, v: torch.Tensor, grid_size: Optional[GridSize]) -> torch.Tensor:
        """Values ``[B, h, N, d]`` -> the training targets in the layout of :meth:`output` (identity but for maps)."""
        return v

    def unfeatures(self, y: torch.Tensor, heads: int) -> torch.Tensor:
        """:meth:`output`'s layout -> tokens ``[B, h, N, out_dim]`` (identity but for maps)."""
        return y

    def hidden(self, x: torch.Tensor, state: State) -> Dict[str, torch.Tensor]:
        """The forward up to the last layer's input (what :meth:`backward` needs)."""
        raise NotImplementedError

    def output(self, x: torch.Tensor, cache: Dict[str, torch.Tensor], state: State) -> torch.Tensor:
        """``F(x)`` from :meth:`hidden`'s cache."""
        raise NotImplementedError

    def backward(self, x: torch.Tensor, cache: Dict[str, torch.Tensor], e: torch.Tensor, state: State) -> State:
        """``{name: dL/dW}`` (``[B, h, a, b]``) from ``E = dL/dF(x)``."""
        raise NotImplementedError

    # --- compositions
    def predict(self, x: torch.Tensor, state: State) -> torch.Tensor:
        """``F(x)`` on features ``x``."""
        return self.output(x, self.hidden(x, state), state)

    def grads(self, k: torch.Tensor, v: torch.Tensor, state: State, loss: InnerLoss, scale: float,
              num_tokens: Optional[int] = None, token_weights: Optional[torch.Tensor] = None) -> State:
        """Closed-form gradient of the inner loss at ``state`` on key features ``k`` and values ``v [B, h, N, d]``.

        ``num_tokens`` (default: the tokens given) is the size of the whole training set: passing the full count for a
        subset of the tokens gives that subset's share, so shares add up (for additive losses)."""
        cache = self.hidden(k, state)
        prediction = self.output(k, cache, state) if loss.needs_prediction else None
        e = _weighted(loss.grad(prediction, v, scale, num_tokens or k.shape[-2]), token_weights)
        return self.backward(k, cache, e, state)

    def apply(self, q: torch.Tensor, state: State) -> torch.Tensor:
        """The (trained) model on query features ``q``."""
        return self.predict(q, state)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, ratio={self.ratio}'

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.extra_repr()})'


class FC(InnerFunction):
    name = 'fc'

    def shapes(self):
        return {'w1': (self.dim, self.dim)}

    def hidden(self, x, state):
        return {}

    def output(self, x, cache, state):
        return x @ state['w1']

    def backward(self, x, cache, e, state):
        return {'w1': x.transpose(-2, -1) @ e}


class SiLUFC(InnerFunction):
    name = 'silu_fc'

    def shapes(self):
        return {'w1': (self.dim, self.dim)}

    def hidden(self, x, state):
        return {'z1': x @ state['w1']}

    def output(self, x, cache, state):
        return F.silu(cache['z1'])

    def backward(self, x, cache, e, state):
        return {'w1': x.transpose(-2, -1) @ (e * silu_grad(cache['z1']))}


class MLP(InnerFunction):
    """``SiLU(x W1) W2`` (depth 2) or ``SiLU(SiLU(x W1) W2) W3`` (depth 3); hidden width ``ratio · d``."""

    name = 'mlp'
    RESIDUALS = (None, 'add', 'identity_w2', 'init_identity')

    def __init__(self, dim: int, ratio: int = 1, depth: int = 2, residual: Optional[str] = None):
        super().__init__(dim, ratio)
        if depth not in (2, 3):
            raise ValueError(f'inner_depth must be 2 or 3, got {depth!r}')
        if residual not in self.RESIDUALS:
            raise ValueError(f'inner_residual must be one of {self.RESIDUALS}, got {residual!r}')
        if residual in ('identity_w2', 'init_identity') and ratio != 1:
            raise ValueError(f'inner_residual={residual!r} needs a square last layer (inner_ratio=1), '
                             f'got ratio {ratio}')
        self.depth, self.residual = depth, residual

    def shapes(self):
        d, m = self.dim, self.dim * self.ratio
        if self.depth == 2:
            return {'w1': (d, m), 'w2': (m, d)}
        return {'w1': (d, m), 'w2': (m, m), 'w3': (m, d)}

    def _last(self, state):
        w = state[f'w{self.depth}']
        return w + torch.eye(w.shape[-1], dtype=w.dtype, device=w.device) if self.residual == 'identity_w2' else w

    def hidden(self, x, state):
        cache, a = {}, x
        for i in range(1, self.depth):
            cache[f'z{i}'] = z = a @ state[f'w{i}']
            cache[f'a{i}'] = a = F.silu(z)
        return cache

    def output(self, x, cache, state):
        y = cache[f'a{self.depth - 1}'] @ self._last(state)
        return y + x if self.residual == 'add' else y

    def backward(self, x, cache, e, state):
        last = self.depth
        grads = {f'w{last}': cache[f'a{last - 1}'].transpose(-2, -1) @ e}
        delta = (e @ self._last(state).transpose(-2, -1)) * silu_grad(cache[f'z{last - 1}'])
        for i in range(last - 1, 0, -1):
            below = x if i == 1 else cache[f'a{i - 1}']
            grads[f'w{i}'] = below.transpose(-2, -1) @ delta
            if i > 1:
                delta = (delta @ state[f'w{i}'].transpose(-2, -1)) * silu_grad(cache[f'z{i - 1}'])
        return grads

    def extra_repr(self):
        return super().extra_repr() + f', depth={self.depth}, residual={self.residual}'


class SwiGLU(InnerFunction):
    """``((x W1) ⊙ SiLU(x W2)) W3``, hidden ``ratio · d`` (the SwiGLU with its output layer)."""

    name = 'swiglu'

    def shapes(self):
        d, m = self.dim, self.dim * self.ratio
        return {'w1': (d, m), 'w2': (d, m), 'w3': (m, d)}

    def hidden(self, x, state):
        z1, z2 = x @ state['w1'], x @ state['w2']
        return {'z1': z1, 'z2': z2, 'h': z1 * F.silu(z2)}

    def output(self, x, cache, state):
        return cache['h'] @ state['w3']

    def backward(self, x, cache, e, state):
        delta = e @ state['w3'].transpose(-2, -1)
        xt = x.transpose(-2, -1)
        return {'w1': xt @ (delta * F.silu(cache['z2'])), 'w2': xt @ (delta * cache['z1'] * silu_grad(cache['z2'])),
                'w3': cache['h'].transpose(-2, -1) @ e}


class GLU(InnerFunction):
    """ViT³'s simplified SwiGLU ``(x W1) ⊙ SiLU(x W2)`` (d × d each): delegates to :mod:`vittt.ops.glu`."""

    name = 'glu'

    def __init__(self, dim: int, ratio: int = 1):
        if ratio != 1:
            raise ValueError(f"inner_model='glu' maps d -> d (its output is the gate product): inner_ratio must be 1, "
                             f'got {ratio}')
        super().__init__(dim, ratio)

    def shapes(self):
        return {'w1': (self.dim, self.dim), 'w2': (self.dim, self.dim)}

    def hidden(self, x, state):
        return {}

    def output(self, x, cache, state):
        return (x @ state['w1']) * F.silu(x @ state['w2'])

    def grads(self, k, v, state, loss, scale, num_tokens=None, token_weights=None):
        if token_weights is not None:   # the dynamic lr weighs E: the generic chain rule below
            z1, z2 = k @ state['w1'], k @ state['w2']
            prediction = z1 * F.silu(z2) if loss.needs_prediction else None
            e = _weighted(loss.grad(prediction, v, scale, num_tokens or k.shape[-2]), token_weights)
            kt = k.transpose(-2, -1)
            return {'w1': kt @ (e * F.silu(z2)), 'w2': kt @ (e * z1 * silu_grad(z2))}
        w12 = torch.cat([state['w1'], state['w2']], dim=-1)
        g1, g2 = swiglu_inner_grads(k, v, w12, loss, scale, num_tokens).split(self.dim, dim=-1)
        return {'w1': g1, 'w2': g2}


class Conv3x3(FC):
    """A full 3×3 convolution per head (``d -> d`` channels, zero padding): ``fc`` on each token's 3×3 neighbourhood
    of the keys / queries (features ``[B, h, N, 9 d]``, channel-major: ``c · 9 + tap``)."""

    name = 'conv3x3'
    kernel_size = 3

    def shapes(self):
        return {'w1': (self.dim * self.kernel_size ** 2, self.dim)}

    def features(self, x, grid_size):
        if grid_size is None:
            raise ValueError("inner_model='conv3x3' needs the token grid (grid_size)")
        b, h, n, d = x.shape
        gh, gw = grid_size
        if gh * gw != n:
            raise ValueError(f'grid {grid_size} does not hold the {n} tokens')
        maps = x.transpose(-2, -1).reshape(b * h, d, gh, gw)
        patches = F.unfold(maps, self.kernel_size, padding=self.kernel_size // 2)   # [B·h, d·9, N]
        return patches.view(b, h, d * self.kernel_size ** 2, n).transpose(-2, -1)


class DWConv(InnerFunction):
    """A depth-wise k×k convolution over all ``h · d`` channels of the token map: :mod:`vittt.ops.dwconv`. The state
    ``weight`` is ``[1, C, k, k]`` (per sample ``[B, C, k, k]``); normalised over each channel's k×k taps."""

    name = 'dwconv3x3'
    token_wise = False

    def __init__(self, dim: int, ratio: int = 1, kernel_size: int = 3):
        if ratio != 1:
            raise ValueError(f"inner_model='dwconv3x3' has no hidden width: inner_ratio must be 1, got {ratio}")
        super().__init__(dim, ratio)
        self.kernel_size = kernel_size
        self.grid_size: Optional[GridSize] = None

    def shapes(self):
        return {'weight': (self.kernel_size, self.kernel_size)}

    def state_shapes(self, heads):
        return {'weight': (1, heads * self.dim, self.kernel_size, self.kernel_size)}

    @property
    def norm_dims(self):
        return {'weight': (-2, -1)}

    def features(self, x, grid_size):
        """``[B, h, N, d]`` -> the map ``[B, h·d, H, W]`` (channel ``head · d + c``)."""
        if grid_size is None:
            raise ValueError("inner_model='dwconv3x3' needs the token grid (grid_size)")
        b, h, n, d = x.shape
        return x.permute(0, 1, 3, 2).reshape(b, h * d, *grid_size)

    def values(self, v, grid_size):
        return self.features(v, grid_size)

    def output(self, x, cache, state):
        w = state['weight']
        if w.shape[0] == 1:
            return F.conv2d(x, w.reshape(-1, 1, *w.shape[-2:]), padding=self.kernel_size // 2, groups=x.shape[1])
        return dwconv_per_sample(x, w)

    def hidden(self, x, state):
        return {}

    def grads(self, k, v, state, loss, scale, num_tokens=None, token_weights=None):
        if token_weights is not None:
            raise ValueError("inner_lr='dynamic' is defined for token-wise inner models, not 'dwconv3x3'")
        prediction = self.output(k, {}, state) if loss.needs_prediction else None
        e = loss.grad(prediction, v, scale, num_tokens or k.shape[-2] * k.shape[-1], dims=(-3, -2, -1))
        return {'weight': dwconv_inner_grad(k, e, self.kernel_size)}

    def unfeatures(self, y: torch.Tensor, heads: int) -> torch.Tensor:
        """The map ``[B, h·d, H, W]`` back to tokens ``[B, h, N, d]``."""
        b, c = y.shape[:2]
        return y.reshape(b, heads, c // heads, -1).transpose(-2, -1)


def layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with affine ``weight, bias`` (biased variance)."""
    mu = z.mean(-1, keepdim=True)
    return (z - mu) * torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + eps) * weight + bias


def layer_norm_stats(z: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x̃, r)`` of a row-wise LayerNorm, in sums only: ``r = rstd / √d = 1 / √(Σ(z − μ)² + d · eps)`` and
    ``x̃ = (z − μ) · r = x̂ / √d`` (on CPU torch.var_mean is ~10× and Tensor.mean ~1.5× slower than Tensor.sum)."""
    d = z.shape[-1]
    centered = torch.sub(z, z.sum(-1, keepdim=True), alpha=1 / d)
    r = torch.rsqrt(torch.linalg.vecdot(centered, centered).unsqueeze(-1) + d * eps)
    return centered * r, r


def layer_norm_project(g_hat: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """``u = ĝ − Σĝ / d − x̃ · Σ(ĝ x̃)``: LayerNorm's backward without its ``r · √d`` factor (``ĝ = dL/dx̂``)."""
    u = torch.sub(g_hat, g_hat.sum(-1, keepdim=True), alpha=1 / g_hat.shape[-1])
    return torch.addcmul(u, x_t, torch.linalg.vecdot(g_hat, x_t).unsqueeze(-1), value=-1)


def layer_norm_backward(z: torch.Tensor, upstream: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``dL/dz`` from ``upstream = dL/dLN(z)``: with ``x̂ = (z − μ) · rstd`` and ``ĝ = upstream ⊙ weight``,
    ``rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))`` row-wise, computed as ``layer_norm_project(ĝ, x̃) · r · √d``
    (:func:`layer_norm_stats`)."""
    x_t, r = layer_norm_stats(z, eps)
    return layer_norm_project(upstream * weight, x_t) * (r * math.sqrt(z.shape[-1]))


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """Derivative of the exact (erf) GELU."""
    return 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


class TTTLinear(InnerFunction):
    """Vision-TTT's TTT-Linear ``x + LN(x W + b)``; state ``w [d, d]``, ``b [1, d]`` and the fixed ``ln_weight,
    ln_bias [1, d]``."""

    name = 'ttt_linear'
    fixed = ('ln_weight', 'ln_bias')

    def __init__(self, dim: int, ratio: int = 1, eps: float = 1e-6):
        super().__init__(dim, ratio)
        self.eps = eps

    def shapes(self):
        d = self.dim
        return {'w': (d, d), 'b': (1, d), 'ln_weight': (1, d), 'ln_bias': (1, d)}

    def hidden(self, x, state):
        return {'z': x @ state['w'] + state['b']}

    def output(self, x, cache, state):
        return x + layer_norm(cache['z'], state['ln_weight'], state['ln_bias'], self.eps)

    def backward(self, x, cache, e, state):
        dz = layer_norm_backward(cache['z'], e, state['ln_weight'], self.eps)
        return {'w': x.transpose(-2, -1) @ dz, 'b': dz.sum(-2, keepdim=True)}


class TTTMLP(TTTLinear):
    """Vision-TTT's TTT-MLP ``x + LN(GELU(x W1 + b1) W2 + b2)``, hidden ``ratio · d`` (4 in Sun et al.)."""

    name = 'ttt_mlp'

    def shapes(self):
        d, m = self.dim, self.dim * self.ratio
        return {'w1': (d, m), 'b1': (1, m), 'w2': (m, d), 'b2': (1, d), 'ln_weight': (1, d), 'ln_bias': (1, d)}

    def hidden(self, x, state):
        z1 = x @ state['w1'] + state['b1']
        a1 = F.gelu(z1)
        return {'z1': z1, 'a1': a1, 'z': a1 @ state['w2'] + state['b2']}

    def backward(self, x, cache, e, state):
        dz = layer_norm_backward(cache['z'], e, state['ln_weight'], self.eps)
        delta = (dz @ state['w2'].transpose(-2, -1)) * gelu_grad(cache['z1'])
        return {'w1': x.transpose(-2, -1) @ delta, 'b1': delta.sum(-2, keepdim=True),
                'w2': cache['a1'].transpose(-2, -1) @ dz, 'b2': dz.sum(-2, keepdim=True)}


INNER_FUNCTIONS = {cls.name: cls for cls in (FC, SiLUFC, MLP, SwiGLU, GLU, Conv3x3, DWConv, TTTLinear, TTTMLP)}


def make_inner_function(name: str, dim: int, ratio: int = 1, depth: int = 2,
                        residual: Optional[str] = None) -> InnerFunction:
    """The :class:`InnerFunction` ``name`` of head width ``dim``; ``depth`` and ``residual`` apply to ``'mlp'`` only."""
    if name not in INNER_FUNCTIONS:
        raise ValueError(f'unknown inner model {name!r}; choose one of {sorted(INNER_FUNCTIONS)}')
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f'inner_ratio must be a positive integer, got {ratio!r}')
    if name == 'mlp':
        return MLP(dim, ratio, depth, residual)
    if name in ('ttt_linear', 'ttt_mlp') and (depth != 2 or residual is not None):
        raise ValueError(f'{name!r} has its own residual and depth (Vision-TTT); inner_depth / inner_residual do not '
                         f'apply')
    if depth != 2 and name not in ('ttt_linear', 'ttt_mlp'):
        raise ValueError(f"inner_depth applies to inner_model='mlp' only (got inner_depth={depth} for {name!r})")
    if residual is not None:
        raise ValueError(f"inner_residual applies to inner_model='mlp' only (got {residual!r} for {name!r})")
    return INNER_FUNCTIONS[name](dim, ratio)
