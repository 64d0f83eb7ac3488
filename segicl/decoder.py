"""The ControlNet diffusion decoder (paper section 3.3, with the query image as the ControlNet hint).

diffusers parts: a ``UNet2DConditionModel`` that cross-attends to the condition tokens (C in stage 1,
the encoder's S at inference), a ``ControlNetModel`` built from it with ``ControlNetModel.from_unet``
whose hint is the query image (the paper's decoder has no image path and its section 4.6 blames
that for poor edges), and optionally an ``AutoencoderKL`` for masks.

The diffused variable is the mask in [-1, 1]:

* ``space="pixel"``: the (1, M, M) mask, space-to-depth by ``unshuffle`` r (``F.pixel_unshuffle``)
  into (r^2, M/r, M/r). With r = 2 this is a lossless 4 x 32 x 32 "latent" that needs no VAE
  training and costs the same per step as a 4 x 32 x 32 VAE latent (measured ~5x faster to train
  on this CPU than 1 x 64 x 64).
* ``space="latent"``: an ``AutoencoderKL`` (1-channel in/out) encodes the mask; its reconstruction
  is trained in stage 1 beside the diffusion loss (the paper preset loads a Stable Diffusion VAE
  and feeds the mask as 3 identical channels).

Training: ``loss(images, masks, cond)`` is the noise-prediction loss of paper eq. 6 (or the
x0 / v target of ``prediction_type``), with a DDPM noise schedule. Sampling writes the denoising
loop out with a DDIM or DPM-Solver scheduler and draws ``num_samples`` samples per query: their mean
is the probability, their standard deviation the uncertainty.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from torch import nn

from segicl.config import SegICLConfig


def build_scheduler(cfg: SegICLConfig) -> DDPMScheduler:
    """The training noise schedule (DDPM); samplers are built from its config."""
    s = cfg.scheduler
    return DDPMScheduler(
        num_train_timesteps=s.num_train_timesteps,
        beta_schedule=s.beta_schedule,
        beta_start=s.beta_start,
        beta_end=s.beta_end,
        prediction_type=s.prediction_type,
        clip_sample=cfg.decoder.space == "pixel",
        clip_sample_range=1.0,
    )


def sampling_scheduler(train_scheduler: DDPMScheduler, sampler: str):
    if sampler == "ddim":
        return DDIMScheduler.from_config(train_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            train_scheduler.config, timestep_spacing="trailing", algorithm_type="dpmsolver++",
            thresholding=False, lower_order_final=True,
        )
    raise ValueError(f"unknown sampler {sampler!r}; choose ddim or dpm")


class MaskDecoder(nn.Module):
    """UNet + ControlNet (+ VAE) rendering a mask from condition tokens and the query image."""

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel, cfg: SegICLConfig,
                 vae: AutoencoderKL | None = None):
        super().__init__()
        self.cfg = cfg
        self.unet = unet
        self.controlnet = controlnet
        self.vae = vae
        n, d = cfg.num_condition_tokens, cfg.condition.dim
        self.null_cond = nn.Parameter(torch.zeros(1, n, d))  # the "no condition" tokens (cond dropout)
        # Spatial condition path: each token (one mask patch) -> a (c, s, s) tile of a map at the
        # diffused resolution, concatenated to x_t. Cross-attention alone (the paper's design) was
        # measured to render poorly from the true C in our tiny decoder: one-step x0 from pure noise
        # reached Dice 0.47 and sampling stayed there; see docs/model.md.
        self.cond_map_channels = int(cfg.decoder.cond_map_channels)
        self.cond_grid = int(round(n**0.5))
        self.cond_map = None
        if self.cond_map_channels:
            size = unet.config.sample_size
            self.cond_scale = size // self.cond_grid
            if self.cond_scale * self.cond_grid != size:
                raise ValueError(f"condition grid {self.cond_grid} does not divide the diffused size {size}")
            self.cond_map = nn.Linear(d, self.cond_map_channels * self.cond_scale**2)
        if cfg.decoder.space == "latent" and vae is None:
            raise ValueError("decoder.space='latent' needs a VAE")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: SegICLConfig) -> MaskDecoder:
        d = cfg.decoder
        if d.pretrained:
            return cls.from_stable_diffusion(cfg)
        if d.space == "pixel":
            channels, size = d.unshuffle**2, cfg.mask_size // d.unshuffle
            vae = None
        else:
            n = len(d.vae_block_out_channels)
            vae = AutoencoderKL(
                in_channels=1, out_channels=1, latent_channels=d.latent_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(d.vae_block_out_channels), layers_per_block=1,
                norm_num_groups=min(d.norm_num_groups, d.vae_block_out_channels[0]), sample_size=cfg.mask_size,
            )
            channels, size = d.latent_channels, cfg.mask_size // 2 ** (n - 1)
        down = 2 ** (len(d.hint_channels) - 1)
        if cfg.hint_size // down != size:
            raise ValueError(
                f"the ControlNet hint embedding maps a {cfg.hint_size}px image to {cfg.hint_size // down}px, "
                f"but the diffused mask is {size}px: set decoder.hint_channels to {int.bit_length(cfg.hint_size // size)} entries"
            )
        unet = UNet2DConditionModel(
            sample_size=size, in_channels=channels + d.cond_map_channels, out_channels=channels,
            down_block_types=tuple(d.down_block_types), up_block_types=tuple(d.up_block_types),
            block_out_channels=tuple(d.block_out_channels), layers_per_block=d.layers_per_block,
            cross_attention_dim=cfg.condition.dim, attention_head_dim=d.attention_head_dim,
            norm_num_groups=d.norm_num_groups,
        )
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(d.hint_channels))
        return cls(unet, controlnet, cfg, vae)

    @classmethod
    def from_stable_diffusion(cls, cfg: SegICLConfig) -> MaskDecoder:
        """Paper preset: UNet and VAE of a local Stable Diffusion directory, ControlNet from the UNet
        (:func:`segicl.pretrained.load_stable_diffusion`; checks condition.dim = the UNet's
        cross-attention width, 768 for SD 1.5, and the latent / hint sizes)."""
        from segicl.pretrained import load_stable_diffusion

        unet, controlnet, vae = load_stable_diffusion(cfg)
        return cls(unet, controlnet, cfg, vae)

    def structure(self) -> dict[str, Any]:
        """diffusers configs of the parts (saved beside the weights; rebuilt exactly on load)."""
        out = {"unet": dict(self.unet.config), "controlnet": dict(self.controlnet.config)}
        if self.vae is not None:
            out["vae"] = dict(self.vae.config)
        for part in out.values():  # diffusers keeps this as a set: sorted, so a re-save writes the same bytes
            if "_use_default_values" in part:
                part["_use_default_values"] = sorted(part["_use_default_values"])
        return out

    @classmethod
    def from_structure(cls, structure: dict[str, Any], cfg: SegICLConfig) -> MaskDecoder:
        unet = UNet2DConditionModel.from_config(structure["unet"])
        controlnet = ControlNetModel.from_config(structure["controlnet"])
        vae = AutoencoderKL.from_config(structure["vae"]) if "vae" in structure else None
        return cls(unet, controlnet, cfg, vae)

    # ------------------------------------------------------------------ mask <-> diffused variable
    @property
    def vae_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else 1

    def vae_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0)) if self.vae is not None else 1.0

    def encode_masks(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 1, M, M) in {0, 1} -> x0, the variable the diffusion runs on."""
        x = masks.float() * 2 - 1
        if self.vae is None:
            r = self.cfg.decoder.unshuffle
            return F.pixel_unshuffle(x, r) if r > 1 else x
        x = x.expand(-1, self.vae_channels, -1, -1)
        dist = self.vae.encode(x).latent_dist
        return dist.sample(generator) * self.vae_scale()

    def decode_masks(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 -> (B, 1, M, M) probability in [0, 1]."""
        if self.vae is None:
            r = self.cfg.decoder.unshuffle
            x = F.pixel_shuffle(x0, r) if r > 1 else x0
        else:
            x = self.vae.decode(x0 / self.vae_scale()).sample.mean(1, keepdim=True)
        return ((x + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ denoiser
    def hint(self, images: torch.Tensor) -> torch.Tensor:
        """The ControlNet hint: the query image, resized to decoder.hint_size when that differs from it."""
        size = self.cfg.hint_size
        if images.shape[-1] == size and images.shape[-2] == size:
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The UNet output (noise, x0 or v) for noisy ``xt`` at timesteps ``t``."""
        if self.cond_map is not None:
            b, n, _ = cond.shape
            tiles = self.cond_map(cond).transpose(1, 2).reshape(b, -1, self.cond_grid, self.cond_grid)
            xt = torch.cat([xt, F.pixel_shuffle(tiles, self.cond_scale)], 1)
        down, mid = self.controlnet(xt, t, encoder_hidden_states=cond, controlnet_cond=self.hint(images),
                                    return_dict=False)
        return self.unet(xt, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    def loss(self, images: torch.Tensor, masks: torch.Tensor, cond: torch.Tensor, scheduler: DDPMScheduler,
             cond_dropout: float = 0.0, cond_noise: float = 0.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Diffusion training loss (paper eq. 6) on (query image, mask, condition tokens).

        ``cond_dropout`` replaces C by the null condition for that fraction of items; ``cond_noise``
        adds Gaussian noise of that relative scale to C. Both keep the decoder from reading the mask
        from C alone (it must use the image hint), which makes it tolerant of the encoder's imperfect S.
        """
        b = images.shape[0]
        dev = images.device
        out: dict[str, torch.Tensor] = {}
        if self.vae is not None:
            post = self.vae.encode((masks.float() * 2 - 1).expand(-1, self.vae_channels, -1, -1)).latent_dist
            z = post.sample(generator)
            rec = self.vae.decode(z).sample.mean(1, keepdim=True)
            out["vae_rec"] = F.mse_loss(rec, masks.float() * 2 - 1)
            out["vae_kl"] = post.kl().mean() / z[0].numel()
            x0 = z.detach() * self.vae_scale()
        else:
            x0 = self.encode_masks(masks)
        if cond_noise > 0:
            cond = cond + cond_noise * torch.randn(cond.shape, generator=generator, device=dev) * cond.pow(2).mean().sqrt()
        if cond_dropout > 0:
            drop = (torch.rand(b, generator=generator, device=dev) < cond_dropout).view(b, 1, 1)
            cond = torch.where(drop, self.null_cond.expand(b, -1, -1).to(cond.dtype), cond)
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=dev)
        xt = scheduler.add_noise(x0, noise, t)
        pred = self.predict(xt, t, cond, images)
        kind = scheduler.config.prediction_type
        target = {"epsilon": noise, "sample": x0}.get(kind)
        if target is None:
            target = scheduler.get_velocity(x0, noise, t)
        out["diffusion"] = F.mse_loss(pred.float(), target.float())
        loss = out["diffusion"]
        if self.vae is not None:
            loss = loss + out["vae_rec"] + 1e-4 * out["vae_kl"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def sample(self, images: torch.Tensor, cond: torch.Tensor, scheduler: DDPMScheduler, num_inference_steps: int = 10,
               num_samples: int = 1, sampler: str = "ddim", generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise from pure noise: (B, 3, S, S) images + (B, N, d_c) tokens -> (B, num_samples, M, M) probabilities."""
        if num_inference_steps < 1 or num_samples < 1:
            raise ValueError("num_inference_steps and num_samples must be >= 1")
        b = images.shape[0]
        sched = sampling_scheduler(scheduler, sampler)
        sched.set_timesteps(num_inference_steps)
        imgs = images.repeat_interleave(num_samples, 0)
        cnd = cond.repeat_interleave(num_samples, 0).to(self.unet.dtype)
        c = self.unet.config.out_channels
        size = self.unet.config.sample_size
        x = torch.randn((b * num_samples, c, size, size), generator=generator, dtype=torch.float32)
        x = (x * sched.init_noise_sigma).to(images.device, self.unet.dtype)
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            pred = self.predict(xin, tt, cnd, imgs)
            x = sched.step(pred, t, x, generator=generator).prev_sample
        prob = self.decode_masks(x.float())
        return prob.view(b, num_samples, *prob.shape[-2:])
