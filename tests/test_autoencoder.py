"""VAE fine-tuning: the reference's loss, LPIPS parity with a PyTorch transcription of taming's
LPIPS, and a short run through the shared trainer (only the VAE changes; the checkpoint is a full
model checkpoint)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import diad_jax
from diad_jax import autoencoder
from diad_jax.checkpoints import load_model
from diad_jax.errors import CheckpointError
from diad_jax.models.lpips import LPIPS, VGG16_BLOCKS, VGG16_CHANNELS, lpips_params_from_state_dicts


def _torch_lpips(vgg: dict, lin: dict, x, y):
    """taming.modules.losses.lpips.LPIPS.forward written out with torch.nn.functional."""
    import torch

    F = torch.nn.functional
    shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
    scale = torch.tensor([.458, .448, .450])[None, :, None, None]

    def feats(h):
        h = (h - shift) / scale
        out = []
        for b, idxs in enumerate(VGG16_BLOCKS):
            if b:
                h = F.max_pool2d(h, 2, 2)
            for i in idxs:
                h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            out.append(h)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (torch.sqrt(torch.sum(a ** 2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b ** 2, dim=1, keepdim=True)) + 1e-10)
        total = total + F.conv2d((a - b) ** 2, lin[f"lin{k}.model.1.weight"]).mean(dim=[2, 3], keepdim=True)
    return total


def test_lpips_matches_torch_transcription():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    vgg, cin = {}, 3
    for idxs, ch in zip(VGG16_BLOCKS, VGG16_CHANNELS):
        for i in idxs:
            vgg[f"features.{i}.weight"] = torch.randn(ch, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
            vgg[f"features.{i}.bias"] = torch.randn(ch, generator=g) * 0.1
            cin = ch
    lin = {f"lin{k}.model.1.weight": torch.rand(1, ch, 1, 1, generator=g) for k, ch in enumerate(VGG16_CHANNELS)}
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = x + 0.3 * torch.randn(2, 3, 32, 32, generator=g)
    want = _torch_lpips(vgg, lin, x, y).reshape(-1).numpy()
    params = lpips_params_from_state_dicts(vgg, lin)
    got = LPIPS().apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                        jnp.asarray(y.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
    same = LPIPS().apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                         jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    assert float(jnp.max(jnp.abs(same))) == 0.0


def test_autoencoder_loss_is_the_reference_formula():
    """sum|x - x_hat| / B + 1e-6 * sum KL / B with the posterior sample, written out independently."""
    from diad_jax.configs import ModelConfig
    from diad_jax.models.diad import DiAD

    model = DiAD(ModelConfig.tiny())
    params = model.init(seed=0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 64, 64))
    index = jnp.array([3, 7])
    key = jax.random.PRNGKey(5)
    loss, aux = autoencoder.autoencoder_loss(model, {"vae": params["vae"]}, {}, None, {"image": x, "index": index}, key)
    mean, logvar = model.encode_moments(params, x)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, int(i)), mean.shape[1:]) for i in index])
    z = mean + jnp.exp(0.5 * logvar) * noise
    x_hat = model.decode(params, model.config.scale_factor * z)
    kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1 - logvar) / 2
    want = jnp.sum(jnp.abs(x - x_hat)) / 2 + 1e-6 * kl
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl"]), float(kl), rtol=1e-5)


def test_discriminator_start_is_refused():
    with pytest.raises(ValueError, match="discriminator"):
        autoencoder.autoencoder_task(autoencoder.reference_config(steps=60_000))


def test_finetune_run_trains_only_the_vae(tmp_path):
    from diad_jax import sharding as shd
    from diad_jax.train import Trainer

    cfg = autoencoder.tiny_config(workdir=str(tmp_path / "run"), steps=3, log_every=1, **{
        "data.data_dir": str(tmp_path / "data"), "checkpoint.save_every": 3, "data.batch_size": 8,
        "data.options": dict(train_per_class=8, test_per_class=2)})
    trainer = Trainer(cfg, mesh=shd.make_mesh(2, 4), task=autoencoder.autoencoder_task(cfg))
    assert set(trainer.state.params) == {"vae"} and not trainer.frozen
    result = trainer.run()
    trainer.close()
    assert result["step"] == 3 and np.isfinite(result["loss"])
    from diad_jax.models.diad import DiAD
    init = jax.device_get(DiAD(trainer.model_config).init(seed=cfg.seed))
    got = load_model(tmp_path / "run" / "checkpoints" / "3")
    flat_init, flat_got = traverse_util.flatten_dict(init), traverse_util.flatten_dict(got.params)
    assert flat_init.keys() == flat_got.keys()
    changed = {k[0] for k in flat_init if not np.array_equal(flat_init[k], flat_got[k])}
    assert changed == {"vae"}
    # the checkpoint says what it is, and scoring refuses it, saying why and what to do
    assert got.metadata["kind"] == "autoencoder"
    with pytest.raises(CheckpointError, match=r"is an autoencoder fine-tuning checkpoint .* its UNet and SG network "
                                              r"never were, so it cannot score; train DiAD from it \(diad-jax train "
                                              r"--init-checkpoint"):
        diad_jax.load(tmp_path / "run")
