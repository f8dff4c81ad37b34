"""The process group a run made is destroyed when the CLI returns (gloo ranks aborted at exit otherwise)."""
from types import SimpleNamespace

import torch.distributed as dist

from vittt.engine import shutdown_distributed


def test_shutdown_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    shutdown_distributed()                                   # no group: nothing to do
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown_distributed()
    assert not dist.is_initialized()


def test_cli_tears_the_group_down(monkeypatch, tmp_path):
    from vittt import cli

    def fake(args):
        dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store2"}', rank=0, world_size=1)
        raise ValueError('boom')                             # an error path tears it down too
    parser = cli.build_parser()
    monkeypatch.setattr(cli, 'build_parser', lambda: parser)
    monkeypatch.setattr(parser, 'parse_args', lambda argv: SimpleNamespace(func=fake, command='train'))
    assert cli.main(['train']) == 2
    assert not dist.is_initialized()
