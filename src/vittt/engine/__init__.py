"""The task-agnostic training engine: one :class:`Trainer` for every task, driven by a small :class:`Task` contract.

Distributed set-up (torchrun; gloo / nccl; rank-0 writing; sharded evaluation), seeding and RNG state, atomic
checkpoints with exact resume, recipes (YAML shipped in the package, typed ``key=value`` overrides), AMP (bf16 /
fp16 with a saved GradScaler), gradient clipping, EMA (timm), lr schedules stepped per update (epoch- or step-based
runs), metrics JSONL / CSV / TensorBoard, the progress bar and curves. Tasks live in :mod:`vittt.tasks`.
"""
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, is_weight_checkpoint, load_model_weights,
                         load_trained_model, load_training_checkpoint, save_checkpoint)
from .distributed import (DistInfo, ShardSampler, all_gather_objects, all_reduce_sum, barrier, eval_loader,
                          init_distributed, shutdown_distributed)
from .recipe import (ENGINE_DEFAULTS, RecipeError, find_recipe, list_recipes, load_recipe, parse_overrides,
                     recipe_defaults, recipe_yaml, scaled_lr)
from .rng import SeededDataset, derive_seed, seed_all
from .task import StepContext, Task, get_task, register_task, registered_tasks
from .trainer import Trainer, move_to

__all__ = ['CHECKPOINT_FORMAT', 'CheckpointError', 'is_weight_checkpoint', 'load_model_weights', 'load_trained_model',
           'load_training_checkpoint', 'save_checkpoint', 'DistInfo',
           'ShardSampler', 'all_gather_objects', 'all_reduce_sum', 'barrier', 'eval_loader', 'init_distributed',
           'shutdown_distributed',
           'ENGINE_DEFAULTS',
           'RecipeError', 'find_recipe', 'list_recipes', 'load_recipe', 'parse_overrides', 'recipe_defaults',
           'recipe_yaml', 'scaled_lr', 'SeededDataset', 'derive_seed', 'seed_all', 'StepContext', 'Task',
           'get_task', 'register_task', 'registered_tasks', 'Trainer', 'move_to']
