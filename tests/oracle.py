"""Independent PyTorch references for the parity tests.

diffusers' PyTorch UNet2DConditionModel, ControlNetModel and AutoencoderKL (the pinned 0.39.x
release), configured from an ldm-style config through diffusers' own
`create_*_diffusers_config_from_ldm` and loaded from an ldm state dict through diffusers' own
single-file converters, so neither the architecture nor the key mapping comes from our code.
The SFF block, which diffusers does not have, is written here in torch from the spec.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from diad_jax.configs import ModelConfig
from diad_jax.convert.ldm import expected_ldm_keys
from diad_jax.models.diad import DiAD

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from diffusers.utils import logging as dlogging

dlogging.set_verbosity_error()
torch.set_grad_enabled(False)


def ldm_original_config(cfg: ModelConfig) -> dict:
    """The reference's yaml (models/diad.yaml) as a dict, for our config's sizes."""
    u, v = cfg.unet, cfg.vae
    unet_params = dict(
        image_size=cfg.latent_size, in_channels=u.in_channels, out_channels=u.out_channels,
        model_channels=u.model_channels, attention_resolutions=list(u.attention_resolutions),
        num_res_blocks=u.num_res_blocks, channel_mult=list(u.channel_mult), num_heads=u.num_heads,
        use_spatial_transformer=True, transformer_depth=u.transformer_depth,
        context_dim=u.context_dim, legacy=False)
    return {"model": {"params": {
        "scale_factor": cfg.scale_factor,
        "unet_config": {"params": unet_params},
        "control_stage_config": {"params": dict(unet_params, hint_channels=cfg.hint_channels)},
        "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": dict(
            double_z=True, z_channels=v.z_channels, resolution=cfg.image_size,
            in_channels=v.in_channels, out_ch=v.out_channels, ch=v.ch, ch_mult=list(v.ch_mult),
            num_res_blocks=v.num_res_blocks, attn_resolutions=[], dropout=0.0)}},
    }}}


def random_ldm_state_dict(cfg: ModelConfig, seed: int = 0, groups=("unet", "sg", "vae")) -> dict:
    """Random float32 numpy weights under every reference key: kernels ~ N(0, 1/fan_in), norm
    scales 1 + N(0, 0.1^2), biases N(0, 0.1^2). Zero-initialised layers get random values too.
    Each tensor is a window at a random offset into one pool of 2^25 standard normals (drawn by
    torch's generator), scaled: SD size is 1.3 G values, which drawing one by one took 18 s."""
    pool = torch.randn(2 ** 25, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).numpy()
    offsets = np.random.default_rng(seed)
    abstract = DiAD(cfg).abstract_params()
    sd = {}
    for key, shape in sorted(expected_ldm_keys(abstract, groups).items()):
        n = int(np.prod(shape))
        start = int(offsets.integers(0, pool.size - n + 1))
        if key.endswith(".bias"):
            scale, shift = 0.1, 0.0
        elif len(shape) == 1:
            scale, shift = 0.1, 1.0
        else:
            scale, shift = int(np.prod(shape[1:])) ** -0.5, 0.0
        w = pool[start:start + n].reshape(shape) * np.float32(scale)
        if shift:
            w += np.float32(shift)
        sd[key] = w
    return sd


def _torch_sd(sd: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def _load(model_cls, config: dict, state_dict: dict):
    with torch.device("meta"):
        model = model_cls(**config)
    missing, unexpected = model.load_state_dict(state_dict, strict=True, assign=True)
    assert not missing and not unexpected
    for name, b in model.named_buffers():
        assert not b.is_meta, f"buffer {name} left on meta device"
    return model.eval()


def unet_config(cfg: ModelConfig) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sfu.create_unet_diffusers_config_from_ldm(ldm_original_config(cfg), {},
                                                          image_size=cfg.image_size)


def diffusers_unet(cfg: ModelConfig, sd: dict) -> UNet2DConditionModel:
    conf = unet_config(cfg)
    return _load(UNet2DConditionModel, conf, sfu.convert_ldm_unet_checkpoint(_torch_sd(sd), conf))


def diffusers_controlnet(cfg: ModelConfig, sd: dict) -> ControlNetModel:
    u = unet_config(cfg)
    # (diffusers' create_controlnet_diffusers_config_from_ldm calls the UNet helper without its
    # checkpoint argument in 0.39, so the same fields are taken from the UNet config here.)
    conf = {k: u[k] for k in ("in_channels", "down_block_types", "block_out_channels",
                              "layers_per_block", "cross_attention_dim", "attention_head_dim",
                              "use_linear_projection", "transformer_layers_per_block")}
    conf.update(conditioning_channels=cfg.hint_channels,
                conditioning_embedding_out_channels=tuple(cfg.hint_block_channels))
    tsd = {k: v for k, v in _torch_sd(sd).items() if k.startswith("control_model.")}
    converted = sfu.convert_controlnet_checkpoint(tsd, conf)
    return _load(ControlNetModel, conf, converted)


def diffusers_vae(cfg: ModelConfig, sd: dict) -> AutoencoderKL:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conf = sfu.create_vae_diffusers_config_from_ldm(ldm_original_config(cfg), {},
                                                        image_size=cfg.image_size)
    tsd = {k: v for k, v in _torch_sd(sd).items() if k.startswith("first_stage_model.")}
    return _load(AutoencoderKL, conf, sfu.convert_ldm_vae_checkpoint(tsd, conf))


def torch_sff(outs: list, sd: dict, cfg: ModelConfig) -> list:
    """The SFF block as the spec states it (section 2), in torch."""
    sources, targets = cfg.sff_sources(), cfg.sff_targets()
    fused = list(outs)
    for j, t in enumerate(targets):
        acc = outs[t]
        for i, s in enumerate(sources):
            w = sd[f"control_model.down{i + 1}{j + 1}.0.weight"]
            w = w if isinstance(w, torch.Tensor) else torch.from_numpy(w)
            y = F.conv2d(outs[s], w, bias=None, stride=2, padding=1)
            y = torch.nn.InstanceNorm2d(y.shape[1])(y)  # affine=False, eps=1e-5
            acc = acc + F.silu(y)
        fused[t] = F.silu(acc)
    return fused


def torch_sg_outputs(controlnet, sd, cfg, x, t, ctx, hint) -> list:
    """The SG network's residuals: diffusers ControlNet outputs, then the SFF."""
    down, mid = controlnet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                           torch.from_numpy(hint), conditioning_scale=1.0, return_dict=False)
    return torch_sff(list(down), sd, cfg) + [mid]


def torch_controlled_unet(unet, cfg, x, t, ctx, control: list, only_mid_control: bool):
    """DiAD's ControlledUnetModel on diffusers' UNet: the middle residual always; skip residuals
    on every skip, or (only_mid_control) only on the skips the first decoder level pops."""
    n = len(control) - 1
    levels = cfg.unet.skip_levels()
    down = []
    for k in range(n):
        use = (not only_mid_control) or levels[k] == cfg.unet.num_levels - 1
        c = control[k] if isinstance(control[k], torch.Tensor) else torch.from_numpy(control[k])
        down.append(c if use else torch.zeros_like(c))
    mid = control[-1] if isinstance(control[-1], torch.Tensor) else torch.from_numpy(control[-1])
    out = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
               down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid,
               return_dict=False)[0]
    return out


def max_err(a, b) -> tuple[float, float]:
    """(max abs error, max abs of the reference)."""
    a = np.asarray(a, np.float64)
    b = b.detach().numpy().astype(np.float64) if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))


# ---- ResNet-50 (timm / torchvision layout) and CLIP -----------------------------------------------
RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))


def random_timm_resnet50(seed: int = 0) -> dict:
    """Random weights under timm's/torchvision's resnet50 names (layer4 and fc included),
    BatchNorm running statistics random too."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, o, i, k):
        sd[name + ".weight"] = rng.standard_normal((o, i, k, k), dtype=np.float32) * np.float32((i * k * k) ** -0.5)

    def bn(name, c):
        sd[name + ".weight"] = 1 + 0.1 * rng.standard_normal(c, dtype=np.float32)
        sd[name + ".bias"] = 0.1 * rng.standard_normal(c, dtype=np.float32)
        sd[name + ".running_mean"] = 0.1 * rng.standard_normal(c, dtype=np.float32)
        sd[name + ".running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[name + ".num_batches_tracked"] = np.array(100, dtype=np.int64)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for s, (n, w) in enumerate(RESNET50_STAGES):
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            conv(p + ".conv1", w, cin, 1); bn(p + ".bn1", w)
            conv(p + ".conv2", w, w, 3); bn(p + ".bn2", w)
            conv(p + ".conv3", 4 * w, w, 1); bn(p + ".bn3", 4 * w)
            if i == 0:
                conv(p + ".downsample.0", 4 * w, cin, 1); bn(p + ".downsample.1", 4 * w)
            cin = 4 * w
    sd["fc.weight"] = rng.standard_normal((1000, 2048), dtype=np.float32) * np.float32(2048 ** -0.5)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


def hf_resnet50(timm_sd: dict):
    """transformers' PyTorch ResNetModel (an independent implementation) with these weights."""
    from transformers import ResNetConfig, ResNetModel

    def name(k):
        k = k.replace("conv1.", "embedder.embedder.convolution.", 1) if k.startswith("conv1.") else k
        k = k.replace("bn1.", "embedder.embedder.normalization.", 1) if k.startswith("bn1.") else k
        import re as _re
        m = _re.match(r"layer(\d)\.(\d+)\.(.*)", k)
        if m:
            s, i, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
            rest = _re.sub(r"^conv(\d)\.", lambda g: f"layer.{int(g.group(1)) - 1}.convolution.", rest)
            rest = _re.sub(r"^bn(\d)\.", lambda g: f"layer.{int(g.group(1)) - 1}.normalization.", rest)
            rest = rest.replace("downsample.0.", "shortcut.convolution.").replace("downsample.1.", "shortcut.normalization.")
            k = f"encoder.stages.{s}.layers.{i}.{rest}"
        return k

    model = ResNetModel(ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3],
                                     hidden_sizes=[256, 512, 1024, 2048], embedding_size=64)).eval()
    sd = {name(k): torch.from_numpy(np.asarray(v)) for k, v in timm_sd.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return model


def random_clip_state_dict(hidden: int, layers: int = 2, positions: int = 77, seed: int = 0,
                           prefix: str = "cond_stage_model.transformer.") -> dict:
    """A small random CLIP text tower (HF names) under the ldm prefix."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         max_position_embeddings=positions, hidden_act="quick_gelu")
    model = CLIPTextModel(cfg)
    # ldm checkpoints use transformers-4 names (`text_model.` level); transformers 5 drops it
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v.numpy().copy()
            for k, v in model.state_dict().items()}
