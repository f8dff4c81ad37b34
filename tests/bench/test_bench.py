"""``vittt bench``: spec parsing, variant expansion, ratio and crossover arithmetic, the memory worker, and the
command end to end on tiny models (no timing assertions: only structure and finiteness)."""
import json
import math
import subprocess
import sys

import pytest
import torch

from vittt.bench import (BenchSettings, Variant, build_variants, compute_crossovers, compute_ratios, expand_variants,
                         find_crossover, memory_ratio, parse_model_spec, probe_model, resolve_baseline, speedup)
from vittt.bench.memory import main as memory_main
from vittt.bench.workload import Workload, build_model, create_model, make_step
from vittt.cli import main

VIT3 = 'vit3_tiny:depth=1,embed_dim=48,num_heads=2'
DEIT = 'deit_tiny_patch16_224:depth=1'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# --- model specs and variants -----------------------------------------------------------------------------------

def test_parse_model_spec():
    spec = parse_model_spec('vit3_tiny:depth=2,embed_dim=64')
    assert (spec.name, spec.kwargs, spec.text) == ('vit3_tiny', {'depth': 2, 'embed_dim': 64},
                                                    'vit3_tiny:depth=2,embed_dim=64')
    assert parse_model_spec('deit_tiny_patch16_224').kwargs == {}
    spec = parse_model_spec('hvit3_tiny:depths=[1,1,1,1],drop_path_rate=1e-3,act_layer=gelu,img_size=(64, 96)')
    assert spec.kwargs == {'depths': (1, 1, 1, 1), 'drop_path_rate': 1e-3, 'act_layer': 'gelu',
                           'img_size': (64, 96)}
    assert parse_model_spec('x:flag=true,scale=null').kwargs == {'flag': True, 'scale': None}
    for bad in (':depth=1', 'x:depth', 'x:depth=1,depth=2', 'x:1a=3'):
        with pytest.raises(ValueError, match='model spec'):
            parse_model_spec(bad)


def test_expand_variants_from_counts():
    spec = parse_model_spec('m:depth=1')
    assert [v.label for v in expand_variants(spec, 0, 0, ['fused', 'math'], lean=True)] == ['m:depth=1']
    labels = [v.label for v in expand_variants(spec, 12, 0, ['fused', 'math'], lean=True)]
    assert labels == ['m:depth=1', 'm:depth=1+math']
    assert [v.label for v in expand_variants(spec, 12, 0, ['math'], lean=False)] == ['m:depth=1+math']
    variants = expand_variants(spec, 0, 3, ['fused', 'math'], lean=True)
    assert [(v.label, v.attn, v.lean) for v in variants] == [('m:depth=1', None, False), ('m:depth=1+lean', None, True)]
    assert [v.label for v in expand_variants(spec, 0, 3, ['fused'], lean=False)] == ['m:depth=1']
    variants = expand_variants(spec, 12, 0, ['fused', 'math'], lean=False, compiled=True)
    assert [(v.label, v.attn, v.compiled) for v in variants] == [
        ('m:depth=1', 'fused', False), ('m:depth=1+math', 'math', False), ('m:depth=1+compile', 'fused', True)]
    assert [(v.label, v.attn) for v in expand_variants(spec, 0, 0, ['fused'], False, True)] == [
        ('m:depth=1', None), ('m:depth=1+compile', None)]
    with pytest.raises(ValueError, match='attention mode'):
        expand_variants(spec, 1, 0, ['flash'], lean=False)


def test_probe_real_models():
    """DeiT has timm attention and no lean mode; ViT³ has a lean mode and no timm attention."""
    assert probe_model(create_model(parse_model_spec(DEIT), (32, 32))) == (1, 0)
    attention, lean_blocks = probe_model(create_model(parse_model_spec(VIT3), (32, 32)))
    assert attention == 0 and lean_blocks > 0


def test_build_variants_and_baseline(capsys):
    settings = BenchSettings(models=[VIT3, DEIT], sizes=[(32, 32)], attn=['fused', 'math'], lean=True)
    variants, params = build_variants(settings)
    labels = [v.label for v in variants]
    assert labels == [VIT3, f'{VIT3}+lean', DEIT, f'{DEIT}+math']
    assert params[DEIT] == params[f'{DEIT}+math'] > 0
    assert resolve_baseline(variants, None) == DEIT  # the first deit* variant
    assert resolve_baseline(variants, f'{DEIT}+math') == f'{DEIT}+math'
    assert resolve_baseline(variants[:2], None) == VIT3  # no DeiT: the first variant
    with pytest.raises(ValueError, match='not among the variants'):
        resolve_baseline(variants, 'deit_small_patch16_224')

    # --lean without any lean-capable model: a warning, no +lean variant
    variants, _ = build_variants(BenchSettings(models=[DEIT], sizes=[(32, 32)], lean=True))
    assert [v.label for v in variants] == [DEIT]
    assert 'none of the models has a memory-lean mode' in capsys.readouterr().err


def test_deit_is_built_at_the_benchmark_resolution():
    """timm's DeiT is fixed-size: each resolution gets its own instance (patch 16 -> a 2×2 grid at 32²)."""
    spec = parse_model_spec(DEIT)
    variant = expand_variants(spec, 1, 0, ['math'], lean=False)[0]
    model = build_model(Workload(variant, (32, 48), 'infer', 'fp32'))
    assert model.patch_embed.grid_size == (2, 3)
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn'))
    make_step(model, Workload(variant, (32, 48), 'infer', 'fp32'))()


@pytest.mark.parametrize('mode,dtype', [('infer', 'bf16'), ('train', 'bf16'), ('train', 'fp32')])
def test_steps_run(mode, dtype):
    variant = expand_variants(parse_model_spec(VIT3), 0, 0, ['fused'], lean=False)[0]
    workload = Workload(variant, (32, 32), mode, dtype, batch_size=2)
    model = build_model(workload)
    assert model.training == (mode == 'train')
    assert next(model.parameters()).dtype == (torch.bfloat16 if mode == 'infer' else torch.float32)
    make_step(model, workload)()
    if mode == 'train':
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --- ratios and crossovers --------------------------------------------------------------------------------------

def test_speedup_and_memory_ratio():
    assert speedup(30.0, 10.0) == 3.0  # variant three times faster than the baseline
    assert speedup(10.0, 20.0) == 0.5
    assert speedup(None, 1.0) is None and speedup(1.0, None) is None
    assert memory_ratio(50, 200) == 0.25
    assert memory_ratio(None, 200) is None and memory_ratio(50, None) is None and memory_ratio(50, 0) is None


def test_compute_ratios_and_crossovers():
    def entry(variant, size, ms, act):
        return dict(variant=variant, mode='infer', dtype='fp32', size=[size, size], tokens=(size // 16) ** 2,
                    time=dict(median_ms=ms), memory=dict(activation_bytes=act))
    measurements = [entry('base', 224, 10.0, 100), entry('base', 448, 40.0, 400),
                    entry('ttt', 224, 20.0, 50), entry('ttt', 448, 20.0, 100)]
    ratios = compute_ratios(measurements, 'base')
    assert [(r['variant'], r['size'], r['speedup'], r['memory_ratio']) for r in ratios] == [
        ('ttt', [224, 224], 0.5, 0.5), ('ttt', [448, 448], 2.0, 0.25)]
    (crossover,) = compute_crossovers(ratios)
    assert crossover['status'] == 'crosses' and crossover['size'] == [448, 448]
    assert crossover['side'] == pytest.approx(math.sqrt(224 * 448))  # symmetric speed-ups: the log midpoint


def test_find_crossover():
    sizes = [(224, 224), (448, 448), (896, 896)]
    assert find_crossover(sizes, [0.5, 0.8, 0.9]).status == 'never'
    assert find_crossover(sizes, [0.5, 0.8, 0.9]).size is None
    always = find_crossover(sizes, [1.2, 1.5, 3.0])
    assert (always.status, always.size, always.tokens) == ('always', [224, 224], None)
    crossing = find_crossover(sizes, [0.5, 0.8, 1.6])
    assert crossing.status == 'crosses' and crossing.size == [896, 896]
    assert 448 < crossing.side < 896 and 784 < crossing.tokens < 3136
    # log speed-up linear in log pixels: 0.8 -> 1.6 is one doubling, 1 is a third of the way up
    assert crossing.side == pytest.approx(448 * 2 ** (math.log(1 / 0.8) / math.log(2)))
    faster_then_slower = find_crossover(sizes, [1.2, 0.9, 1.1])  # must stay faster: the last crossing counts
    assert faster_then_slower.size == [896, 896] and 448 < faster_then_slower.side < 896
    assert find_crossover(list(reversed(sizes)), [1.6, 0.8, 0.5]).size == [896, 896]  # order does not matter
    assert find_crossover([], []).status == 'unknown'
    assert find_crossover([(224, 224)], [1.0]).status == 'never'  # equal is not faster


# --- the memory worker ------------------------------------------------------------------------------------------

def _worker(spec, attn, size, mode='infer'):
    config = dict(spec=spec, attn=attn, lean=False, size=[size, size], mode=mode, dtype='fp32', batch_size=1,
                  device='cpu', threads=1)
    return subprocess.Popen([sys.executable, '-m', 'vittt.bench.memory', json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_memory_worker_sees_the_attention_matrix():
    """Explicit attention at 512² holds 3 heads × 1025² fp32 scores (12.6 MB, twice with the softmax): the peak
    must show it, and a 64² input (65 tokens) must need far less. A train step runs in the worker too."""
    procs = [_worker(DEIT, 'math', 64), _worker(DEIT, 'math', 512), _worker(VIT3, None, 32, mode='train')]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for result in results:
        assert result['method'].startswith('procfs')
        assert result['peak_rss_growth_bytes'] >= result['activation_bytes']
        assert result['activation_bytes'] > 0
        assert result['total_bytes'] >= result['activation_bytes']
        assert result['total_bytes'] >= result['before_bytes']
    scores = 3 * 1025 ** 2 * 4
    assert results[1]['activation_bytes'] >= scores
    assert results[1]['activation_bytes'] > results[0]['activation_bytes'] + scores


def test_memory_worker_reports_errors_as_json(capsys):
    config = dict(spec='no_such_model_xyz', size=[32, 32], mode='infer', dtype='fp32')
    assert memory_main([json.dumps(config)]) == 1
    assert 'no_such_model_xyz' in json.loads(capsys.readouterr().out)['error']


# --- the command ------------------------------------------------------------------------------------------------

def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / 'bench'
    assert main(['bench', '--models', VIT3, DEIT, '--sizes', '32', '48', '--repeats', '2', '--warmup', '1',
                 '--attn', 'fused', 'math', '--lean', '--mode', 'infer', 'train', '--threads', '1', '--no-memory',
                 '--output', str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / 'bench.json').read_text())
    labels = [VIT3, f'{VIT3}+lean', DEIT, f'{DEIT}+math']
    assert [v['label'] for v in result['variants']] == labels
    assert result['settings']['baseline'] == DEIT and result['settings']['threads'] == 1
    assert result['command'][:2] == ['vittt', 'bench']
    assert result['matmul']['fp32']['gmacs_per_s'] > 0
    keys = {(m['variant'], m['mode'], tuple(m['size'])) for m in result['measurements']}
    expected = {(label, 'infer', (s, s)) for label in labels for s in (32, 48)}
    expected |= {(label, 'train', (s, s)) for label in labels if not label.endswith('+lean') for s in (32, 48)}
    assert keys == expected  # lean variants run in infer mode only
    for m in result['measurements']:
        t = m['time']
        assert len(t['times_ms']) == 2 and all(math.isfinite(v) and v > 0 for v in t['times_ms'])
        assert t['min_ms'] <= t['median_ms'] <= t['max_ms'] and t['images_per_s'] > 0
        assert m['macs'] > 0 and m['memory'] is None
        if m['mode'] == 'infer':
            assert 0 < t['fraction_of_matmul']
    macs = {(m['variant'], tuple(m['size'])): m['macs'] for m in result['measurements']}
    assert macs[DEIT, (48, 48)] == macs[f'{DEIT}+math', (48, 48)]  # fused attention is counted by formula
    assert all(r['baseline'] == DEIT and r['speedup'] > 0 and r['memory_ratio'] is None for r in result['ratios'])
    assert {(c['variant'], c['mode']) for c in result['crossovers']} == {
        (label, mode) for label, mode, _ in expected if label != DEIT}
    markdown = (out / 'bench.md').read_text()
    for label in labels:
        assert label in markdown and label in printed
    assert '## infer fp32' in markdown and '## train fp32' in markdown
    assert (out / 'bench.png').read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob('.*.tmp'))  # atomic writes leave no temporaries


def test_bench_memory_only(tmp_path):
    """--no-time: peak memory from fresh worker processes, memory ratios against the baseline, no speed-ups."""
    out = tmp_path / 'bench'
    assert main(['bench', '--models', VIT3, DEIT, '--sizes', '32', '--no-time', '--threads', '1',
                 '--output', str(out)]) == 0
    result = json.loads((out / 'bench.json').read_text())
    assert result['matmul'] == {}
    for m in result['measurements']:
        assert m['time'] is None
        assert m['memory']['activation_bytes'] > 0
        assert m['memory']['total_bytes'] >= m['memory']['activation_bytes']
    (ratio,) = result['ratios']
    assert ratio['variant'] == VIT3 and ratio['speedup'] is None and ratio['memory_ratio'] > 0
    assert 'act. MiB' in (out / 'bench.md').read_text()
    assert (out / 'bench.png').read_bytes()[:8] == PNG_MAGIC


def test_memory_repeats_keep_the_median_reading(monkeypatch, tmp_path):
    """--memory-repeats N: N fresh processes per configuration, the reading with the median activation kept (all
    recorded); a failed reading is reported as it is, not averaged away."""
    from vittt.bench import runner
    readings = iter([dict(activation_bytes=a, total_bytes=a + 100) for a in (30, 10, 20)] +
                    [dict(activation_bytes=5, total_bytes=9), dict(error='worker exited with code 1')])
    monkeypatch.setattr(runner, '_memory_in_subprocess', lambda config: next(readings))
    workload = Workload(Variant(DEIT, parse_model_spec(DEIT)), (32, 32), 'infer', 'fp32', 1)
    kept = runner._measure_memory(workload, 1, repeats=3)
    assert kept['activation_bytes'] == 20 and kept['total_bytes'] == 120
    assert kept['activation_runs_bytes'] == [30, 10, 20]
    assert runner._measure_memory(workload, 1, repeats=2) == dict(error='worker exited with code 1')
    with pytest.raises(ValueError, match='--memory-repeats must be at least 1'):
        BenchSettings(models=[DEIT], sizes=[(32, 32)], memory_repeats=0).validate()
    out = tmp_path / 'bench'
    monkeypatch.setattr(runner, '_memory_in_subprocess', lambda config: dict(activation_bytes=7, total_bytes=8))
    assert main(['bench', '--models', DEIT, '--sizes', '32', '--no-time', '--memory-repeats', '2',
                 '--output', str(out)]) == 0
    (entry,) = json.loads((out / 'bench.json').read_text())['measurements']
    assert entry['memory']['activation_runs_bytes'] == [7, 7]
    assert 'each of 2 fresh processes' in (out / 'bench.md').read_text()


def test_bench_errors(tmp_path, capsys):
    assert main(['bench', '--models', 'vit3_tinyy', '--sizes', '32', '--output', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'vit3_tinyy'" in err and 'vit3_tiny' in err
    assert main(['bench', '--models', f'{DEIT}', '--sizes', '32', '--baseline', 'resnet50', '--no-memory',
                 '--output', str(tmp_path)]) == 2
    assert 'not among the variants' in capsys.readouterr().err
    assert main(['bench', '--models', 'vit3_tiny:no_such_kwarg=1', '--sizes', '32', '--output', str(tmp_path)]) == 2
    assert 'no_such_kwarg' in capsys.readouterr().err
    assert main(['bench', '--models', DEIT, '--sizes', '32', '--no-time', '--no-memory',
                 '--output', str(tmp_path)]) == 2
    assert 'nothing to measure' in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(['bench', '--models', DEIT, '--sizes', '32', '--device', 'cuda', '--output', str(tmp_path)]) == 2
        assert 'CUDA is not available' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written on errors


@pytest.mark.slow
def test_bench_compiled_variants(tmp_path):
    """--compile: a +compile variant per model, timed after a compiling warm-up even with --warmup 0, the same
    MACs as the eager model, CPU memory reported as not measured (with the reason) while eager variants are
    measured."""
    out = tmp_path / 'bench'
    assert main(['bench', '--models', VIT3, '--sizes', '32', '--repeats', '1', '--warmup', '0', '--compile',
                 '--threads', '1', '--output', str(out)]) == 0
    result = json.loads((out / 'bench.json').read_text())
    labels = [VIT3, f'{VIT3}+compile']
    assert [v['label'] for v in result['variants']] == labels
    entries = {m['variant']: m for m in result['measurements']}
    assert set(entries) == set(labels) and not any('error' in m for m in entries.values())
    for label in labels:
        assert len(entries[label]['time']['times_ms']) == 1
    assert entries[f'{VIT3}+compile']['macs'] == entries[VIT3]['macs']
    assert entries[VIT3]['memory']['activation_bytes'] > 0
    memory = entries[f'{VIT3}+compile']['memory']
    assert memory['activation_bytes'] is None and 'compil' in memory['reason']
    assert any('+compile' in note for note in result['notes'])


@pytest.mark.slow
def test_bench_onnxruntime_variants(tmp_path):
    """--backend ort: a +ort variant per model (ViT³ and DeiT the same way), exported and checked once per resolution,
    timed in onnxruntime beside eager, inference only, memory reported as not measured."""
    pytest.importorskip('onnxruntime')
    out = tmp_path / 'bench'
    vit3 = 'vit3_tiny:depth=1,embed_dim=32,num_heads=2'
    assert main(['bench', '--models', vit3, DEIT, '--sizes', '32', '--repeats', '1', '--warmup', '0', '--backend',
                 'ort', '--mode', 'infer', 'train', '--threads', '1', '--output', str(out)]) == 0
    result = json.loads((out / 'bench.json').read_text())
    labels = [vit3, f'{vit3}+ort', DEIT, f'{DEIT}+ort']
    assert [v['label'] for v in result['variants']] == labels
    infer = {m['variant']: m for m in result['measurements'] if m['mode'] == 'infer'}
    train = {m['variant'] for m in result['measurements'] if m['mode'] == 'train'}
    assert set(infer) == set(labels) and train == {vit3, DEIT} and not any('error' in m for m in infer.values())
    assert all(math.isfinite(infer[label]['time']['median_ms']) for label in labels)
    assert 'onnxruntime' in infer[f'{vit3}+ort']['memory']['reason']
    assert any('+ort' in note for note in result['notes'])


def test_compiled_workload_round_trip():
    variant = expand_variants(parse_model_spec(VIT3), 0, 0, ['fused'], lean=False, compiled=True)[1]
    workload = Workload(variant, (32, 32), 'infer', 'fp32')
    again = Workload.from_config(workload.to_config(threads=1))
    assert again.variant.compiled and again.variant.label == f'{VIT3}+compile'
    assert isinstance(build_model(again), torch._dynamo.eval_frame.OptimizedModule)


# --- DiT workloads ----------------------------------------------------------------------------------------------

DIT3 = 'dit3_s_2:depth=1,embed_dim=48,num_heads=2'
DIT = 'dit_s_2:depth=1,embed_dim=48,num_heads=2'


def test_dit_workload_runs_on_the_latent_of_the_image_size():
    from vittt.bench.workload import model_input
    from vittt.models.dit3 import DiT3

    variant = expand_variants(parse_model_spec(DIT3), 0, 0, ['fused'], lean=False)[0]
    workload = Workload(variant, (64, 96), 'train', 'fp32', batch_size=2)
    model = build_model(workload)
    assert isinstance(model, DiT3)
    shape, model_args = model_input(model, (64, 96))
    assert shape == (4, 8, 12) and model_args is not None  # the SD-VAE latent: size / 8, 4 channels
    make_step(model, workload)()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match='divisible by 8'):
        model_input(model, (60, 64))


def test_bench_dit_end_to_end(tmp_path, capsys):
    """DiT³ against the attention DiT (the default baseline when there is no DeiT), MACs of the latent input."""
    out = tmp_path / 'bench'
    assert main(['bench', '--models', DIT3, DIT, '--sizes', '64', '128', '--repeats', '1', '--warmup', '0',
                 '--mode', 'infer', 'train', '--threads', '1', '--no-memory', '--output', str(out)]) == 0
    result = json.loads((out / 'bench.json').read_text())
    assert result['settings']['baseline'] == DIT
    macs = {(m['variant'], m['mode'], m['size'][0]): m['macs'] for m in result['measurements']}
    from vittt.bench import count_macs
    from vittt.models.dit3 import create_dit, dit_model_args
    for spec, size in ((DIT3, 64), (DIT, 128)):
        model = create_dit(spec.split(':')[0], depth=1, embed_dim=48, num_heads=2)
        assert macs[spec, 'infer', size] == count_macs(model, (4, size // 8, size // 8), model_args=dit_model_args)
    assert macs[DIT, 'infer', 128] > 4 * macs[DIT, 'infer', 64] * 0.99  # 4× the tokens, attention grows faster
    assert {(r['variant'], r['mode']) for r in result['ratios']} == {(DIT3, 'infer'), (DIT3, 'train')}
    assert all(r['speedup'] > 0 for r in result['ratios'])
    assert main(['bench', '--models', 'dit3_q_2', '--sizes', '64', '--output', str(tmp_path / 'x')]) == 2
    assert "unknown model 'dit3_q_2'" in capsys.readouterr().err
    assert main(['bench', '--models', DIT3, '--sizes', '60', '--no-memory', '--output', str(tmp_path / 'x')]) == 2
    assert 'divisible by 8' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()
