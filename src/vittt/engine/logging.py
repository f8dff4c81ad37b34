"""Metrics of a run: one row per log point, appended to metrics.jsonl, rewritten as metrics.csv, and sent to
TensorBoard when it is installed; the progress bar."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..io import atomic_write

__all__ = ['MetricsLog', 'progress_bar']


class MetricsLog:
    """Rows of a run in ``output`` (rank 0 only writes; other ranks keep the history in memory)."""

    def __init__(self, output: Path, write: bool, history: Optional[List[Dict[str, Any]]] = None):
        self.output, self.write, self.history = Path(output), write, list(history or [])
        self._tb = None

    def append(self, row: Dict[str, Any], x_key: str) -> None:
        self.history.append(row)
        if not self.write:
            return
        with open(self.output / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        lines = [','.join(keys)] + [','.join(str(r.get(k, '')) for k in keys) for r in self.history]
        atomic_write(self.output / 'metrics.csv', lambda tmp: Path(tmp).write_text('\n'.join(lines) + '\n'))
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.output / 'tb'))
            except ImportError:
                self._tb = False
        if self._tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ('epoch', 'step'):
                    self._tb.add_scalar(k, v, row[x_key])

    def truncate_file(self) -> None:
        """Rewrite metrics.jsonl to the rows in memory (a resumed run drops rows written after its checkpoint)."""
        if self.write and (self.output / 'metrics.jsonl').exists():
            text = ''.join(json.dumps(r) + '\n' for r in self.history)
            atomic_write(self.output / 'metrics.jsonl', lambda tmp: Path(tmp).write_text(text))

    def close(self) -> None:
        if self._tb:
            self._tb.close()
            self._tb = None


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit='it', leave=False, file=sys.stderr, dynamic_ncols=True)
