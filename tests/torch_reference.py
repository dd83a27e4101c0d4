"""The reference's denoise-and-score path in PyTorch, transcribed from DiAD's test.py,
sgn.py `log_images_test`, ldm's ddim.py / ddpm.py and utils/util.py `cal_anomaly_map`,
on diffusers' PyTorch models (see oracle.py) with the same weights.

Used as the parity oracle of the whole scoring pipeline and as the PyTorch baseline in the
benchmarks. The two Gaussian draws (posterior sample, q_sample noise) are passed in, so both
implementations can see the same noise.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from diad_jax.configs import ModelConfig

from tests import oracle


class ReferenceSchedule:
    """ldm register_schedule (float64 numpy, float32 buffers) + ddim.py make_schedule."""

    def __init__(self, ddim_steps=10, ddim_eta=0.0, T=1000, linear_start=0.00085, linear_end=0.012):
        betas = (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, T, dtype=torch.float64) ** 2).numpy()
        acp = np.cumprod(1.0 - betas, axis=0)
        self.sqrt_alphas_cumprod = torch.tensor(np.sqrt(acp), dtype=torch.float32)
        self.sqrt_one_minus_alphas_cumprod = torch.tensor(np.sqrt(1.0 - acp), dtype=torch.float32)
        acp32 = torch.tensor(acp, dtype=torch.float32)
        c = T // ddim_steps
        self.ddim_timesteps = np.asarray(list(range(0, T, c))) + 1
        alphas = acp32[self.ddim_timesteps]
        alphas_prev = np.asarray([acp32[0]] + acp32[self.ddim_timesteps[:-1]].tolist())
        sigmas = ddim_eta * np.sqrt((1 - alphas_prev) / (1 - alphas.numpy()) * (1 - alphas.numpy() / alphas_prev))
        self.ddim_alphas = alphas.to(torch.float32)
        self.ddim_alphas_prev = torch.tensor(alphas_prev, dtype=torch.float32)
        self.ddim_sigmas = torch.tensor(sigmas, dtype=torch.float32)
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - self.ddim_alphas)

    def q_sample(self, x0, t: int, noise):
        return self.sqrt_alphas_cumprod[t] * x0 + self.sqrt_one_minus_alphas_cumprod[t] * noise


class TorchDiAD:
    def __init__(self, cfg: ModelConfig, sd: dict, timm_resnet: dict | None = None):
        self.cfg, self.sd = cfg, sd
        self.controlnet = oracle.diffusers_controlnet(cfg, sd)
        self.unet = oracle.diffusers_unet(cfg, sd)
        self.vae = oracle.diffusers_vae(cfg, sd)
        self.resnet = oracle.hf_resnet50(timm_resnet) if timm_resnet is not None else None

    def apply_model(self, x, t, ctx, hint, only_mid_control=True):
        down, mid = self.controlnet(x, t, ctx, hint, conditioning_scale=1.0, return_dict=False)
        control = oracle.torch_sff(list(down), self.sd, self.cfg) + [mid]
        levels = self.cfg.unet.skip_levels()
        last = self.cfg.unet.num_levels - 1
        res = [c if (not only_mid_control or levels[k] == last) else torch.zeros_like(c)
               for k, c in enumerate(control[:-1])]
        return self.unet(x, t, ctx, down_block_additional_residuals=tuple(res),
                         mid_block_additional_residual=control[-1], return_dict=False)[0]

    @torch.no_grad()
    def reconstruct(self, images, posterior_noise, noise, context, uncond_context=None,
                    guidance_scale=9.0, schedule="official", sched: ReferenceSchedule | None = None):
        """log_images_test: z0 = 0.18215 * posterior sample; x_T = q_sample(z0, 999); DDIM 901..1
        with CFG in one batched pass [uncond; cond]; decode."""
        sched = sched or ReferenceSchedule()
        x = torch.as_tensor(np.array(images))
        b = x.shape[0]
        dist = self.vae.encode(x).latent_dist
        z0 = self.cfg.scale_factor * (dist.mean + dist.std * torch.as_tensor(np.array(posterior_noise)))
        t_noise = 999 if schedule == "official" else int(sched.ddim_timesteps[-1])
        img = sched.q_sample(z0, t_noise, torch.as_tensor(np.array(noise)))
        ctx = torch.as_tensor(np.array(context)).expand(b, -1, -1)
        uctx = ctx if uncond_context is None else torch.as_tensor(np.array(uncond_context)).expand(b, -1, -1)
        steps = np.flip(sched.ddim_timesteps)
        total = len(steps)
        for i, step in enumerate(steps):
            index = total - i - 1
            ts = torch.full((b,), int(step), dtype=torch.long)
            if guidance_scale == 1.0:
                e_t = self.apply_model(img, ts, ctx, x)
            else:
                out = self.apply_model(torch.cat([img] * 2), torch.cat([ts] * 2), torch.cat([uctx, ctx]),
                                       torch.cat([x, x]))
                e_u, e_c = out.chunk(2)
                e_t = e_u + guidance_scale * (e_c - e_u)
            a_t = sched.ddim_alphas[index]
            a_prev = sched.ddim_alphas_prev[index]
            sigma_t = sched.ddim_sigmas[index]
            sqrt_one_minus_at = sched.ddim_sqrt_one_minus_alphas[index]
            pred_x0 = (img - sqrt_one_minus_at * e_t) / a_t.sqrt()
            dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
            img = a_prev.sqrt() * pred_x0 + dir_xt
        return self.vae.decode(img / self.cfg.scale_factor).sample

    @torch.no_grad()
    def score(self, images, recon, sigma=5.0):
        """test.py: ResNet layer1..3 of input and reconstruction, cal_anomaly_map (amap_mode 'a'),
        scipy gaussian_filter, then EvalImageMax (8 x avg_pool2d(8, stride 1), max). Per image,
        as the reference (batch 1)."""
        x = torch.as_tensor(np.array(images))
        fi = self.resnet(x, output_hidden_states=True).hidden_states[1:4]
        fo = self.resnet(recon, output_hidden_states=True).hidden_states[1:4]
        size = x.shape[-1]
        maps = []
        for n in range(x.shape[0]):
            amap = np.zeros([size, size])
            for a, b in zip(fi, fo):
                m = 1 - F.cosine_similarity(a[n:n + 1], b[n:n + 1])
                m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=True)
                amap += m[0, 0].numpy()
            maps.append(gaussian_filter(amap, sigma=sigma))
        maps = np.stack(maps)
        pooled = torch.tensor(maps[:, None])
        for _ in range(8):
            pooled = F.avg_pool2d(pooled, 8, stride=1)
        return maps, pooled.reshape(len(maps), -1).max(dim=1).values.numpy()
