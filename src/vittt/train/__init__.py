"""Training and evaluation (classification): recipes as data, one engine for one or many processes."""
from .engine import CHECKPOINT_FORMAT, DistInfo, Trainer, build_model, evaluate, init_distributed, load_training_checkpoint
from .recipe import DEFAULTS, RecipeError, load_recipe, parse_overrides, scaled_lr
