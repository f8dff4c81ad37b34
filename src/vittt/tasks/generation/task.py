"""Class-conditional image generation with DiT³ / DiT on the engine: the IDDPM hybrid loss, step-based and constant-lr
like the official ``train.py``, in pixel space or in a local VAE's latent space.

One training step on ``(images, labels)``: encode to latents when a VAE is given (a posterior sample × scale, as the
official code), draw t ~ U{0..T-1}, ε ~ N(0, I) and the label-dropout mask from a generator seeded by (seed, update,
rank), form x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε and minimise ``mse + vb``. Evaluation is the same loss on the validation set
at fixed t, noise and dropout (a generator seeded by the run's seed: every evaluation sees the same draws), plus a
sample grid written to ``samples/`` by rank 0.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ...engine import StepContext, Task, all_reduce_sum, derive_seed, register_task

__all__ = ['GenerationTask', 'GENERATION_DEFAULTS']

# The official dittt/train.py values (spec dit3.md §1.12): AdamW lr 1e-4, wd 0, constant lr, no warm-up, no clipping,
# global batch 256 (32 per process on 8 GPUs), EMA 0.9999 per step at that batch, checkpoints every 50k steps.
GENERATION_DEFAULTS: Dict[str, Any] = dict(
    epochs=None, steps=400_000, batch_size=32, lr=1e-4, lr_base_batch=None, weight_decay=0.0, clip_grad=None,
    sched='constant', warmup_epochs=0, warmup_steps=0, model_ema=True, model_ema_decay=0.9999,
    model_ema_ref_batch=256, eval_every=50_000, checkpoint_every=0, num_workers=4,
    image_size=256, num_classes=None, class_dropout_prob=0.1, learn_sigma=True, num_timesteps=1000,
    vae=None, latent_scale=None, hflip=0.5, val_batches=4,
    sample_sampler='ddim50', sample_cfg=4.0, sample_per_class=1, sample_classes=10,
)

_SALT_TRAIN, _SALT_EVAL = 0x7EA1, 0xE7A1


def recipe_vae(recipe: Dict[str, Any], device):
    """The recipe's VAE loaded on ``device`` (None when it trains in pixel space)."""
    if not recipe.get('vae'):
        return None
    from ...diffusion.vae import load_vae
    return load_vae(recipe['vae'], device)


@register_task
class GenerationTask(Task):
    """``recipe`` (a DiT name in ``model``, constructor overrides in ``model_kwargs``) + the data's channels and
    class count. Logs ``train_loss`` (= mse + vb), ``mse``, ``vb``; evaluates ``val_loss``, ``val_mse``, ``val_vb``;
    ``best.pth`` by the lowest ``val_loss``."""
    name = 'generation'
    produces = 'vittt generate train'
    defaults = GENERATION_DEFAULTS
    best_metric, best_mode = 'val_loss', 'min'
    resume_keys = ('image_size', 'vae', 'num_timesteps')

    def __init__(self, recipe: Dict[str, Any], data_channels: int, num_classes: int, vae=None,
                 moments: bool = False):
        super().__init__(recipe)
        if moments and vae is None:
            raise ValueError('training on cached posterior parameters (a latent cache) needs the VAE that wrote them')
        self.moments = moments  # batches hold the VAE posterior's parameters (a latent cache), not images
        from ...diffusion import GaussianTables, linear_betas

        self.tables = GaussianTables(linear_betas(recipe['num_timesteps']))
        self.num_classes = recipe['num_classes'] or num_classes
        self.data_channels, self.vae = data_channels, vae
        self.latent_scale = None
        if vae is not None:
            from ...diffusion.vae import latent_scale
            self.latent_scale = latent_scale(vae, recipe['latent_scale'])
        self.model_channels = vae.config.latent_channels if vae is not None else data_channels

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any], vae_device=None) -> 'GenerationTask':
        """To rebuild the generator: ``vae_device`` loads the recipe's VAE there (if it has one), for sampling
        images; without it the model is built all the same (its channels are the checkpoint's) and samples stay in
        the model's space."""
        identity, recipe = ckpt['identity'], dict(ckpt['recipe'])
        vae = None if vae_device is None else recipe_vae(recipe, vae_device)
        channels = identity['in_chans'] if vae is None else vae.config.in_channels
        return cls(recipe, channels, identity['num_classes'], vae)

    # ------------------------------------------------------------------ the contract
    def build_model(self) -> nn.Module:
        from ...models.dit3 import create_dit

        kwargs = dict(in_chans=self.model_channels, num_classes=self.num_classes,
                      class_dropout_prob=self.recipe['class_dropout_prob'], learn_sigma=self.recipe['learn_sigma'])
        kwargs.update(self.recipe.get('model_kwargs') or {})
        return create_dit(self.recipe['model'], **kwargs)

    def identity(self) -> Dict[str, Any]:
        return dict(model_name=self.recipe['model'], num_classes=self.num_classes, in_chans=self.model_channels,
                    latent_scale=self.latent_scale)

    def _to_model_space(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.vae is None:
            return images
        from ...diffusion.vae import encode, sample_moments
        if self.moments:
            return sample_moments(images.float(), self.latent_scale, generator=generator)
        return encode(self.vae, images, self.latent_scale, generator=generator).float()

    def _losses(self, model, images, labels, generator: torch.Generator):
        x0 = self._to_model_space(images, generator)
        b = x0.shape[0]
        t = torch.randint(0, self.tables.num_timesteps, (b,), generator=generator, device=generator.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        drop = torch.rand(b, generator=generator, device=generator.device) < self.recipe['class_dropout_prob']
        t, noise, drop = t.to(x0.device), noise.to(x0.device), drop.to(x0.device)
        x_t = self.tables.q_sample(x0, t, noise)
        out = model(x_t, t, labels, drop_mask=drop if self.recipe['class_dropout_prob'] > 0 else None)
        from ...diffusion import hybrid_loss
        return hybrid_loss(out.float(), x0, x_t, t, noise, self.tables, learn_sigma=self.recipe['learn_sigma'])

    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(*parts))

    def train_step(self, model, batch, ctx: StepContext):
        images, labels = batch
        g = self._generator(_SALT_TRAIN, self.recipe['seed'], ctx.step, ctx.info.rank)
        losses = self._losses(model, images, labels, g)
        return losses['loss'].mean(), dict(mse=losses['mse'].mean().item(), vb=losses['vb'].mean().item())

    def evaluate(self, model, loader, ctx: StepContext) -> Dict[str, float]:
        g = self._generator(_SALT_EVAL, self.recipe['seed'], ctx.info.rank)
        sums = [0.0, 0.0, 0.0, 0.0]
        for i, (images, labels) in enumerate(loader):
            if self.recipe['val_batches'] and i >= self.recipe['val_batches']:
                break
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            with ctx.autocast():
                losses = self._losses(model, images, labels, g)
            sums = [a + b for a, b in zip(sums, (losses['loss'].sum().item(), losses['mse'].sum().item(),
                                                   losses['vb'].sum().item(), len(images)))]
        loss, mse, vb, count = all_reduce_sum(sums, ctx.info)
        if count == 0:
            raise ValueError('the evaluation set is empty')
        if ctx.info.is_main and ctx.output is not None:
            self.write_grid(model, ctx.output / 'samples' / f'step{ctx.step:07d}{"_ema" if ctx.is_ema else ""}.png',
                            ctx.device)
        return dict(val_loss=loss / count, val_mse=mse / count, val_vb=vb / count)

    # ------------------------------------------------------------------ samples
    def sample(self, model, labels, image_shape, cfg_scale: float, sampler: str, seed: int,
               device=None, batch_size: Optional[int] = None) -> torch.Tensor:
        """Images (or decoded latents) in [-1, 1] for ``labels``; every draw from a generator seeded by ``seed``.
        With ``batch_size``, chunks of that many labels, chunk i drawing from a generator seeded by (seed, i):
        batch-independent and much faster on CPU than one huge batch (and it bounds the memory)."""
        labels = list(labels)
        if batch_size is not None and len(labels) > batch_size:
            return torch.cat([self.sample(model, labels[i:i + batch_size], image_shape, cfg_scale, sampler,
                                          derive_seed(seed, i // batch_size), device)
                              for i in range(0, len(labels), batch_size)])
        from ...diffusion import linear_betas, make_scheduler, sample

        h, w = image_shape
        if self.vae is not None:
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            h, w = h // factor, w // factor
        scheduler = make_scheduler(sampler, linear_betas(self.tables.num_timesteps),
                                   learn_sigma=self.recipe['learn_sigma'])
        x = sample(model, scheduler, labels, (self.model_channels, h, w), cfg_scale=cfg_scale,
                   generator=torch.Generator().manual_seed(seed))
        if self.vae is not None:
            from ...diffusion.vae import decode
            x = decode(self.vae, x, self.latent_scale)
        return x.float().clamp(-1, 1)

    def write_grid(self, model, path, device=None, cfg_scale: Optional[float] = None) -> None:
        """A grid of ``sample_per_class`` rows × ``sample_classes`` classes, fixed noise (the run's seed)."""
        from ...io import atomic_write
        from torchvision.utils import save_image

        classes = min(self.recipe['sample_classes'], self.num_classes)
        labels = [c for _ in range(self.recipe['sample_per_class']) for c in range(classes)]
        size = self.recipe['image_size']
        images = self.sample(model, labels, (size, size), self.recipe['sample_cfg'] if cfg_scale is None
                             else cfg_scale, self.recipe['sample_sampler'], self.recipe['seed'], device)
        atomic_write(path, lambda tmp: save_image((images + 1) / 2, tmp, nrow=classes, format='png'))

    def report(self, history, output, title: Optional[str] = None) -> None:
        from ...engine.plots import plot_runs

        plot_runs({title or self.recipe['model']: history}, output / 'curves.png',
                  title=title or self.recipe['model'], metric='val_mse')
