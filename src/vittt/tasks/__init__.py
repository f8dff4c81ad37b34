"""Tasks on the engine, one package each: the task contract (:class:`vittt.engine.Task`) and what its commands do.

Importing this package registers every task, so recipes can name them (``task: classification``).
"""
from . import classification, dense, generation  # noqa: F401

__all__ = ["classification", "dense", "generation"]
