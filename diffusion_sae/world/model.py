"""The ShapesCanvas pipeline: a genuine diffusers `StableDiffusionPipeline` small enough for a CPU.

- vae: `PixelShuffleVAE`, a parameter-free, lossless stand-in for `AutoencoderKL`: "encoding" is
  pixel-unshuffle (32x32x3 -> 16x16x12), decoding is pixel-shuffle. It gives the UNet a 16x16
  latent grid (4x cheaper convolutions than pixel space) with nothing to train.
- unet: `UNet2DConditionModel` with cross-attention in `down_blocks.1-2`, the mid block and
  `up_blocks.0-1`, so SAeUron's hookpoints (`unet.up_blocks.1.attentions.k`) exist.
- text_encoder / tokenizer: `CLIPTextModel` + `CLIPTokenizer` (our own small BPE vocabulary).
- scheduler: DDIM with a zero-terminal-SNR cosine schedule and v-prediction.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, DDIMScheduler, DDPMScheduler, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import MAX_LENGTH, build_tokenizer


class _DecoderOutput:
    def __init__(self, sample):
        self.sample = sample


class _LatentDist:
    def __init__(self, z):
        self._z = z

    def sample(self, generator=None):
        return self._z

    def mode(self):
        return self._z


class _EncoderOutput:
    def __init__(self, z):
        self.latent_dist = _LatentDist(z)


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """Lossless VAE stand-in: latents are the image's pixel-unshuffled values in [-1, 1].

    `block_out_channels` only sets the pipeline's `vae_scale_factor` (2 ** (len - 1)); it must
    agree with `factor`.
    """

    @register_to_config
    def __init__(self, factor: int = 2, in_channels: int = 3, latent_channels: int = 12,
                 scaling_factor: float = 1.0, block_out_channels: tuple = (1, 1),
                 force_upcast: bool = False):
        super().__init__()
        if 2 ** (len(block_out_channels) - 1) != factor or latent_channels != in_channels * factor ** 2:
            raise ValueError(f"PixelShuffleVAE: inconsistent config factor={factor}, "
                             f"block_out_channels={block_out_channels}, latent_channels={latent_channels}")
        # ModelMixin needs one tensor to report a device and dtype, and diffusers' loader needs a
        # weights file to exist: one saved zero.
        self.register_buffer("anchor", torch.zeros(1), persistent=True)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        z = F.pixel_unshuffle(x, self.config.factor)
        return _EncoderOutput(z) if return_dict else (_LatentDist(z),)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        x = F.pixel_shuffle(z, self.config.factor)
        return _DecoderOutput(x) if return_dict else (x,)


@dataclass
class ShapesCanvasModelConfig:
    image_size: int = 32
    factor: int = 2
    block_out_channels: tuple = (32, 64, 64)
    layers_per_block: int = 1
    heads: tuple = (1, 2, 2)           # diffusers' `attention_head_dim` is the number of heads
    text_width: int = 64
    text_layers: int = 4
    text_heads: int = 4
    cross_attn_top: bool = False      # cross-attention at the 16x16 level too
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["heads"] = list(self.heads)
        return d


def build_unet(cfg: ShapesCanvasModelConfig) -> UNet2DConditionModel:
    lat = 3 * cfg.factor ** 2
    top = "CrossAttnDownBlock2D" if cfg.cross_attn_top else "DownBlock2D"
    top_up = "CrossAttnUpBlock2D" if cfg.cross_attn_top else "UpBlock2D"
    return UNet2DConditionModel(
        sample_size=cfg.image_size // cfg.factor,
        in_channels=lat, out_channels=lat,
        down_block_types=(top, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", top_up),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=8,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=tuple(cfg.heads),
    )


def build_text_encoder(cfg: ShapesCanvasModelConfig, tokenizer) -> CLIPTextModel:
    tc = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_LENGTH, projection_dim=cfg.text_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(tc)


def build_noise_scheduler() -> DDPMScheduler:
    # Zero terminal SNR + v-prediction: without them a small pixel model leaks the mean colour of
    # the noise at t = T and paints tinted backgrounds (measured on this project's CPU runs; see Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", rescale_betas_zero_snr=True,
                         clip_sample=False)


def build_sampler(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing",
                                     set_alpha_to_one=False, steps_offset=1)


def build_components(cfg: ShapesCanvasModelConfig, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tok = build_tokenizer()
    return {
        "unet": build_unet(cfg),
        "text_encoder": build_text_encoder(cfg, tok),
        "tokenizer": tok,
        "vae": PixelShuffleVAE(factor=cfg.factor, latent_channels=3 * cfg.factor ** 2,
                               block_out_channels=(1,) * (int(math.log2(cfg.factor)) + 1)),
        "noise_scheduler": build_noise_scheduler(),
    }


def make_pipeline(unet, text_encoder, tokenizer, vae, noise_scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=build_sampler(noise_scheduler), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
