"""The ablation rows of ViT³'s tables built from switches: params and MACs at 224² against exact counts and the
paper."""
import pytest
import timm
import torch

import vittt  # noqa: F401  (registers the models)
from vittt.bench import count_macs, count_params
from vittt.tasks.ablate.tables import BASE_MODEL, TABLES

N, H, D, L, C = 196, 6, 64, 12, 384          # tokens at 224², heads, head width, blocks, width
PER = N * H * L                               # (token, head, layer) triples
#: per row, the exact change against the base: (params, MACs); in units of d² per head and layer (and N for MACs)
EXACT = {
    'MSE (L2)': (0, 1), 'RMSE': (0, 1), 'MAE (L1)': (0, 1), 'Smooth L1': (0, 1),   # the keys' last-layer forward
    '1 epoch, batch N/2': (0, 0), '1 epoch, batch N/3': (0, 0), '1 epoch, batch N/4': (0, 0),
    '2 epochs, batch N': (0, 4), '3 epochs, batch N': (0, 8), '4 epochs, batch N': (0, 12),  # 4 N d² an epoch
    'MLP r2': (2, 6), 'MLP r3': (4, 12), 'MLP r4': (6, 18),                      # 6 r d² MACs, 2 r d² params
    'FC(x)': (-1, -4), 'MLP r1, 3 layers': (1, 4), 'SiLU(FC(x))': (-1, -3), 'SwiGLU(x)': (1, 3),
    'FC(x) ⊙ SiLU(FC(x))': (0, 0), 'Conv3×3(x)': (7, 12),
}


def _build(switches, depth=L):
    with torch.device('meta'):
        model = timm.create_model(BASE_MODEL, depth=depth, **switches)
    return count_params(model), count_macs(model, (3, 224, 224))


@pytest.fixture(scope='module')
def counts():
    """Every row's ``(params, MACs)`` of the 12-block model at 224², from a 1-block build: the blocks are identical, so
    the 12-block count is the 1-block count plus 11 more blocks (checked on three rows by full builds)."""
    rows = {row.label: row for t in (1, 2, 4, 6) for row in TABLES[t]}
    stem = _build({}, depth=0)
    full = {label: tuple(s + L * (b - s) for s, b in zip(stem, _build(row.switches, depth=1)))
            for label, row in rows.items()}
    return rows, full, full['MLP r1']


def test_one_block_counts_scale_to_the_full_model(counts):
    _, full, _ = counts
    for label, switches in (('MLP r1', {}), ('FC(x)', {'inner_model': 'fc'}),
                            ('2 epochs, batch N', {'inner_epochs': 2})):
        assert _build(switches) == full[label], label


def test_the_base_is_the_paper_base(counts):
    _, _, (params, macs) = counts
    assert round(macs / 1e9, 2) == 4.57                   # paper: 4.58 (the paper rounds up its counter's extras)
    assert abs(params / 1e6 - 22.61) < 0.01               # paper: 23.5 (a constant offset; docs/design_space.md)


def test_every_row_changes_params_and_macs_exactly_as_derived(counts):
    rows, built, (base_params, base_macs) = counts
    for label, (dp, dm) in EXACT.items():
        params, macs = built[label]
        assert params - base_params == dp * D * D * H * L, label
        assert macs - base_macs == dm * D * D * PER, label
    # the depth-wise conv on all heads: 9 taps per channel instead of two d x d matrices per head
    params, macs = built['DWConv3×3(x)']
    assert params - base_params == (9 * D - 2 * D * D) * H * L
    assert macs - base_macs == (18 * D - 6 * D * D) * PER
    for label in ('SiLU(xW₁)W₂ + x', 'SiLU(xW₁)(W₂ + I)', 'SiLU(xW₁)W₂, W₂ = I at init'):
        assert built[label] == (base_params, base_macs), label


def test_deltas_match_the_papers_rows_within_its_rounding(counts):
    rows, built, (base_params, base_macs) = counts
    for label, row in rows.items():
        params, macs = built[label]
        if row.flops is not None:   # both paper values are rounded to 0.01 G
            assert abs((macs - base_macs) / 1e9 - (row.flops - 4.58)) <= 0.0101, label
        if row.params is not None:  # ... and to 0.1 M
            assert abs((params - base_params) / 1e6 - (row.params - 23.5)) <= 0.101, label


def test_dynamic_lr_adds_one_projection_row_per_head():
    params, macs = _build({'inner_lr': 'dynamic'}, depth=1)
    base_params, base_macs = _build({}, depth=1)
    assert params - base_params == (C + 1) * H
    assert macs - base_macs == C * H * N
