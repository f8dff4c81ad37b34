"""A wheel install (not editable) ships the recipes: build the wheel, install it into a fresh virtual environment,
and resolve recipes there from a folder outside the repository."""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_ships_the_recipes(tmp_path):
    source = tmp_path / 'source'  # a copy: building in place would leave build/ and *.egg-info in the checkout
    shutil.copytree(ROOT / 'src', source / 'src', ignore=shutil.ignore_patterns('__pycache__', '*.egg-info'))
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / 'dist'
    build = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                            '-w', str(dist), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel, = dist.glob('vittt-*.whl')

    env_dir = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(env_dir)], check=True, timeout=300)
    python = env_dir / 'bin' / 'python'
    install = subprocess.run([str(python), '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    # The dependencies (torch, timm, ...) come from this environment, after the wheel's own site-packages; a path
    # added by a .pth file is not scanned for .pth files, so this environment's editable vittt stays invisible.
    site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, 'deps.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')

    where = subprocess.run([str(python), '-c', 'import vittt, sys; print(vittt.__file__)'], capture_output=True,
                           text=True, cwd=tmp_path, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout
    for model, drop_path in (('vit3_small', 0.1), ('hvit3_base', 0.6)):
        shown = subprocess.run([str(env_dir / 'bin' / 'vittt'), 'train', '--model', model, '--print-recipe'],
                               capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert shown.returncode == 0, shown.stderr[-3000:]
        recipe = yaml.safe_load(shown.stdout)
        assert shown.stdout.startswith(f'# recipe {model} ')
        assert recipe['model'] == model and recipe['drop_path'] == drop_path and recipe['epochs'] == 300
    listed = subprocess.run([str(env_dir / 'bin' / 'vittt'), 'recipes'], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert listed.returncode == 0 and 'fashion_mnist_demo' in listed.stdout and 'hvit3_base' in listed.stdout
