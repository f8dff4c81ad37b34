"""The rows of ViT³'s ablation tables (spec ``vit3.md`` A.6) as design-space switches of ``vit3_design_small``, with
the paper's numbers (params in M, FLOPs = multiply-accumulates in G at 224², FPS on the paper's unstated GPU, ImageNet
top-1; ``*`` = best before the run diverged)."""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional

__all__ = ['Row', 'TABLES', 'TABLE_TITLES', 'get_table', 'BASE_MODEL']

BASE_MODEL = 'vit3_design_small'


class Row(NamedTuple):
    label: str
    switches: Dict[str, Any]
    params: Optional[float]     # paper, M
    flops: Optional[float]      # paper, G (MACs)
    fps: Optional[float]        # paper
    top1: Optional[float]       # paper
    diverged: bool = False      # the paper's top-1 is the best before divergence


TABLE_TITLES = {
    1: 'Table 1 — inner loss (Insight 1)',
    2: 'Table 2 — inner epochs and mini-batches (Insight 2)',
    3: 'Table 3 — inner learning rate (Insight 3)',
    4: 'Table 4 — inner model: width, depth, type, convolution (Insights 4-6)',
    6: 'Table 6 — remedies for the 2-layer MLP (Insight 5)',
}

TABLES: Dict[int, List[Row]] = {
    1: [Row('Dot product', {'inner_loss': 'dot'}, 23.5, 4.58, 1315, 78.9),
        Row('MSE (L2)', {'inner_loss': 'mse'}, 23.5, 4.63, 1296, 79.2),
        Row('RMSE', {'inner_loss': 'rmse'}, 23.5, 4.63, 1269, 78.8),
        Row('MAE (L1)', {'inner_loss': 'mae'}, 23.5, 4.63, 1292, 76.5),
        Row('Smooth L1', {'inner_loss': 'smooth_l1'}, 23.5, 4.63, 1292, 78.1)],
    2: [Row('1 epoch, batch N', {}, None, 4.58, 1315, 78.9),
        Row('1 epoch, batch N/2', {'inner_batches': 2}, None, 4.58, 1201, 78.6),
        Row('1 epoch, batch N/3', {'inner_batches': 3}, None, 4.58, 1131, 78.3),
        Row('1 epoch, batch N/4', {'inner_batches': 4}, None, 4.58, 1101, 78.1),
        Row('2 epochs, batch N', {'inner_epochs': 2}, None, 4.81, 971, 79.1),
        Row('3 epochs, batch N', {'inner_epochs': 3}, None, 5.04, 787, 79.2),
        Row('4 epochs, batch N', {'inner_epochs': 4}, None, 5.27, 659, 57.0, True)],
    3: [Row(f'η = {lr:g}', {'inner_lr': lr}, None, None, None, top1, lr >= 5)
        for lr, top1 in ((0.1, 77.5), (0.2, 78.1), (0.5, 78.7), (1.0, 78.9), (2.0, 78.9), (5.0, 76.7), (10.0, 76.9))]
       + [Row('dynamic', {'inner_lr': 'dynamic'}, None, None, None, 78.7)],
    4: [Row('MLP r1', {}, 23.5, 4.58, 1315, 78.9),
        Row('MLP r2', {'inner_ratio': 2}, 24.1, 4.92, 1119, 79.2),
        Row('MLP r3', {'inner_ratio': 3}, 24.7, 5.27, 938, 79.5),
        Row('MLP r4', {'inner_ratio': 4}, 25.2, 5.62, 836, 79.6),
        Row('FC(x)', {'inner_model': 'fc'}, 23.2, 4.34, 1708, 79.1),
        Row('MLP r1, 3 layers', {'inner_depth': 3}, 23.8, 4.81, 1086, 77.5),
        Row('SiLU(FC(x))', {'inner_model': 'silu_fc'}, 23.2, 4.40, 1456, 79.4),
        Row('SwiGLU(x)', {'inner_model': 'swiglu'}, 23.8, 4.75, 1103, 79.0),
        Row('FC(x) ⊙ SiLU(FC(x))', {'inner_model': 'glu'}, 23.5, 4.58, 1194, 79.7),
        Row('Conv3×3(x)', {'inner_model': 'conv3x3'}, 25.5, 5.27, 979, 79.9),
        Row('DWConv3×3(x)', {'inner_model': 'dwconv3x3'}, 22.9, 4.25, 1366, 80.1)],
    6: [Row('SiLU(xW₁)W₂ (base)', {}, 23.5, 4.58, 1315, 78.9),
        Row('SiLU(xW₁)W₂ + x', {'inner_residual': 'add'}, 23.5, 4.58, 1294, 78.8),
        Row('SiLU(xW₁)(W₂ + I)', {'inner_residual': 'identity_w2'}, 23.5, 4.58, 1294, 79.1),
        Row('SiLU(xW₁)W₂, W₂ = I at init', {'inner_residual': 'init_identity'}, 23.5, 4.58, 1315, 79.0)],
}


def get_table(number: int) -> List[Row]:
    if number not in TABLES:
        raise ValueError(f'no ablation table {number!r}: the paper has tables {sorted(TABLES)} '
                         f'(spec A.6)')
    return TABLES[number]
