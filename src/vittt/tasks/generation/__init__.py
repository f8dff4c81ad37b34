"""Class-conditional image generation with DiT³ / DiT: the diffusion task on the engine, datasets, sampling."""
from .run import load_generator, sample_checkpoint, train
from .task import GENERATION_DEFAULTS, GenerationTask

__all__ = ['GenerationTask', 'GENERATION_DEFAULTS', 'train', 'load_generator', 'sample_checkpoint']
