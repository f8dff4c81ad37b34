"""Diffusion: the process tables, the hybrid loss against an independent float64 computation, the diffusers
schedulers against ADM's respaced sampler, and CFG sampling with every draw from a generator."""
import math

import numpy as np
import pytest
import torch

from vittt.diffusion import GaussianTables, hybrid_loss, linear_betas, make_scheduler, sample, to_uint8
from vittt.models.dit3 import DiT3


def _adm_tables(betas):
    """ADM's GaussianDiffusion arrays, recomputed here in numpy float64 (independent of vittt)."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    pv = betas * (1.0 - ac_prev) / (1.0 - ac)
    return dict(betas=betas, ac=ac, ac_prev=ac_prev, pv=pv, plv=np.log(np.append(pv[1], pv[1:])),
                c1=betas * np.sqrt(ac_prev) / (1.0 - ac), c2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))


def _adm_p_mean_var(tab, out, x_t, t):
    """Learned-range p(x_{t-1} | x_t) of ADM, float64 numpy, t an int array [B]."""
    c = x_t.shape[1]
    eps, v = out[:, :c], out[:, c:]
    b = lambda a: a[t].reshape(-1, 1, 1, 1)
    frac = (v + 1) / 2
    log_var = frac * np.log(b(tab['betas'])) + (1 - frac) * b(tab['plv'])
    x0 = np.sqrt(1 / b(tab['ac'])) * x_t - np.sqrt(1 / b(tab['ac']) - 1) * eps
    return b(tab['c1']) * x0 + b(tab['c2']) * x_t, log_var


def test_tables_match_adm():
    betas = linear_betas()
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000
    mine, adm = GaussianTables(betas), _adm_tables(betas.numpy())
    np.testing.assert_allclose(mine.posterior_log_variance_clipped.numpy(), adm['plv'], rtol=1e-12)
    np.testing.assert_allclose(mine.posterior_mean_coef1.numpy(), adm['c1'], rtol=1e-12)
    np.testing.assert_allclose(mine.posterior_mean_coef2.numpy(), adm['c2'], rtol=1e-12)
    assert mine.posterior_log_variance_clipped[0] == mine.posterior_log_variance_clipped[1]  # clipped at t = 0
    assert linear_betas(250)[-1] == pytest.approx(0.08)  # scaled by 1000 / T


def test_hybrid_loss_against_an_independent_float64_computation():
    """KL by torch.distributions on ADM's float64 posterior; the t = 0 decoder NLL with the exact normal CDF (ADM's
    tanh approximation differs from it by < 1e-3 in the CDF, so that term is compared loosely)."""
    g = torch.Generator().manual_seed(0)
    tables = GaussianTables(linear_betas())
    adm = _adm_tables(linear_betas().numpy())
    b, c = 6, 2
    x0 = torch.rand(b, c, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # the edge bins
    noise = torch.randn(b, c, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 417, 998, 999])
    x_t = tables.q_sample(x0, t, noise)
    out = torch.randn(b, 2 * c, 4, 4, generator=g, dtype=torch.float64) * 0.5
    losses = hybrid_loss(out, x0, x_t, t, noise, tables)

    mse = ((noise - out[:, :c]) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(losses['mse'], mse)
    mean, log_var = _adm_p_mean_var(adm, out.numpy(), x_t.numpy(), t.numpy())
    tb = lambda a: torch.from_numpy(a[t.numpy()].reshape(-1, 1, 1, 1))
    true_mean = tb(adm['c1']) * x0 + tb(adm['c2']) * x_t
    true_std = torch.exp(0.5 * tb(adm['plv'])).expand_as(x0)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(true_mean, true_std),
                                           torch.distributions.Normal(torch.from_numpy(mean),
                                                                      torch.exp(0.5 * torch.from_numpy(log_var))))
    kl_bits = kl.flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(losses['vb'][1:], kl_bits[1:], rtol=1e-10, atol=1e-12)
    # t = 0: -log of the probability mass of x0's bin (edges open) under N(mean, var), exact CDF
    dist = torch.distributions.Normal(torch.from_numpy(mean[:1]), torch.exp(0.5 * torch.from_numpy(log_var[:1])))
    upper = torch.where(x0[:1] > 0.999, torch.ones_like(x0[:1]), dist.cdf(x0[:1] + 1 / 255))
    lower = torch.where(x0[:1] < -0.999, torch.zeros_like(x0[:1]), dist.cdf(x0[:1] - 1 / 255))
    nll_bits = -torch.log(upper - lower).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(losses['vb'][:1], nll_bits, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(losses['loss'], losses['mse'] + losses['vb'])


def test_hybrid_loss_gradients_respect_the_stop_grad():
    g = torch.Generator().manual_seed(1)
    tables = GaussianTables(linear_betas())
    x0 = torch.rand(2, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(2, 1, 4, 4, generator=g)
    t = torch.tensor([3, 600])
    out = torch.randn(2, 2, 4, 4, generator=g, requires_grad=True)
    losses = hybrid_loss(out, x0, tables.q_sample(x0, t, noise), t, noise, tables)
    (grad_vb,) = torch.autograd.grad(losses['vb'].sum(), out, retain_graph=True)
    assert grad_vb[:, :1].abs().max() == 0 and grad_vb[:, 1:].abs().max() > 0  # vb trains the variance only
    (grad_mse,) = torch.autograd.grad(losses['mse'].sum(), out)
    assert grad_mse[:, 1:].abs().max() == 0 and grad_mse[:, :1].abs().max() > 0
    fixed = hybrid_loss(out[:, :1], x0, tables.q_sample(x0, t, noise), t, noise, tables, learn_sigma=False)
    assert torch.equal(fixed['loss'], fixed['mse']) and fixed['vb'].abs().max() == 0


def test_q_sample_equals_diffusers_add_noise():
    scheduler = make_scheduler('ddpm250')
    tables = GaussianTables(linear_betas())
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 3, 5, 7, generator=g), torch.randn(4, 3, 5, 7, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(tables.q_sample(x0, t, noise), scheduler.add_noise(x0, noise, t), atol=3e-6, rtol=0)


def _adm_respacing(num_timesteps=1000, steps=250):
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def test_ddpm250_is_adms_respaced_sampler():
    scheduler = make_scheduler('ddpm250')
    use = _adm_respacing()
    assert sorted(scheduler.timesteps.tolist()) == use and len(use) == 250 and use[0] == 0 and use[-1] == 999
    # ADM's respaced process: betas 1 - ac_t / ac_prev_used
    ac = _adm_tables(linear_betas().numpy())['ac']
    respaced = 1 - ac[use] / np.append(1.0, ac[use][:-1])
    tab = _adm_tables(respaced)
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 2, 4, 6, generator=g)
    out = torch.randn(2, 4, 4, 6, generator=g).clamp(-1, 1)
    for index in (249, 200, 100, 10, 1):
        t = use[index]
        step = scheduler.step(out, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
        mean, log_var = _adm_p_mean_var(tab, out.double().numpy(), x_t.double().numpy(), np.array([index] * 2))
        expected = torch.from_numpy(mean + np.exp(0.5 * log_var) * z.double().numpy()).float()
        torch.testing.assert_close(step, expected, atol=2e-5, rtol=1e-5)


def _toy(**kwargs):
    torch.manual_seed(0)
    model = DiT3(**dict(dict(in_chans=1, patch_size=2, embed_dim=32, depth=1, num_heads=2, num_classes=3),
                        **kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize('sampler', ['ddpm250', 'ddim50', 'dpm++25'])
def test_sampling_is_reproducible_from_a_generator_and_any_shape(sampler):
    model = _toy()
    scheduler = make_scheduler(sampler)
    run = lambda seed, cfg: sample(model, scheduler, [0, 2], (1, 6, 10), cfg_scale=cfg,
                                   generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0, 1.0), run(0, 1.0), run(1, 1.0)
    assert a.shape == (2, 1, 6, 10) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    guided = run(0, 3.0)
    assert guided.shape == a.shape and not torch.equal(guided, a)


def test_cfg_uses_the_models_null_class_and_no_doubled_batch_at_scale_one(monkeypatch):
    model = _toy()
    seen = []
    forward = model.forward

    def spy(x, t, y, drop_mask=None):
        seen.append((x.shape[0], y.tolist()))
        return forward(x, t, y, drop_mask)

    monkeypatch.setattr(model, 'forward', spy)
    scheduler = make_scheduler('ddim5')
    sample(model, scheduler, [1, 2], (1, 4, 4), cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert seen == [(2, [1, 2])] * 5
    seen.clear()
    sample(model, scheduler, [1, 2], (1, 4, 4), cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert seen == [(4, [1, 2, 3, 3])] * 5  # null = num_classes = 3, not 1000


def test_schedulers_get_the_variance_only_when_they_use_it(monkeypatch):
    model = _toy()
    for sampler, channels in (('ddpm10', 2), ('ddim10', 1), ('dpm++10', 1)):
        scheduler = make_scheduler(sampler)
        shapes = []
        step = scheduler.step
        monkeypatch.setattr(scheduler, 'step', lambda out, *a, **k: shapes.append(out.shape[1]) or step(out, *a, **k))
        sample(model, scheduler, [0], (1, 4, 4), generator=torch.Generator().manual_seed(0))
        assert set(shapes) == {channels}, sampler


def test_errors():
    with pytest.raises(ValueError, match="unknown sampler 'euler10'"):
        make_scheduler('euler10')
    with pytest.raises(ValueError, match='exceed the 1000 training timesteps'):
        make_scheduler('ddim2000')
    with pytest.raises(ValueError, match='cfg_scale must be >= 1'):
        sample(_toy(), make_scheduler('ddim5'), [0], (1, 4, 4), cfg_scale=0.5)
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


def test_latent_path_with_a_tiny_local_vae(tmp_path, tiny_vae):
    """A tiny AutoencoderKL saved to a folder: load it, encode grey images, two training steps of a DiT³ in its latent
    space with the hybrid loss, sample and decode; everything seeded."""
    from vittt.diffusion.vae import decode, encode, latent_scale, load_vae

    tiny_vae(tmp_path / 'vae')
    vae = load_vae(tmp_path / 'vae')
    scale = latent_scale(vae)
    assert scale == pytest.approx(0.18215) and latent_scale(vae, 0.5) == 0.5
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    latents = encode(vae, images, scale, generator=torch.Generator().manual_seed(0))
    again = encode(vae, images, scale, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (4, 4, 8, 8) and torch.equal(latents, again)
    assert not torch.equal(latents, encode(vae, images, scale, mode=True))

    model = _toy(in_chans=4).train()
    tables = GaussianTables(linear_betas())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        t = torch.randint(0, 1000, (4,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        x_t = tables.q_sample(latents, t, noise)
        loss = hybrid_loss(model(x_t, t, torch.tensor([0, 1, 2, 0])), latents, x_t, t, noise, tables)['loss'].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    z = sample(model, make_scheduler('dpm++5'), [0, 1], (4, 8, 8), cfg_scale=2.0,
               generator=torch.Generator().manual_seed(1))
    pixels = decode(vae, z, scale)
    assert pixels.shape == (2, 3, 16, 16) and torch.isfinite(pixels).all()


def test_vae_errors_say_what_to_pass(tmp_path):
    from vittt.diffusion.vae import load_vae

    with pytest.raises(FileNotFoundError, match='hub id; vittt downloads nothing'):
        load_vae('stabilityai/sd-vae-ft-mse')
    with pytest.raises(FileNotFoundError, match='VAE folder not found'):
        load_vae(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='has no config.json'):
        load_vae(tmp_path / 'empty')
