"""Tiny random-weight pipelines of the four supported families, built from config (no downloads).

They keep each family's structure (SD 1.4's 4-level UNet with cross-attention in down 0-2 / up 1-3,
SDXL's two CLIP encoders and text-time embedding, SD3's CLIP-L + CLIP-G + T5, FLUX's CLIP + T5 and
dual/single-stream blocks) at toy width, so hookpoint names, tensor layouts and batching are the real
ones while a 32x32 image takes a fraction of a second on a CPU. Text-encoder depths match the real
models (12 CLIP-L layers, 32 CLIP-G layers, 24 T5 blocks) because at width 32 they cost nothing and
the published hookpoints (`layers.9`, `layers.10`, `layers.28`, `block.22`) then exist.

CLIP encoders use the real CLIP BPE vocabulary (see clip_bpe.py); T5 encoders use a small byte-level
BPE trained here on a fixed word list, wrapped with T5's conventions (`</s>` appended, `<pad>` = 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

FAMILIES = ("sd", "sdxl", "sd3", "flux")

# A fixed corpus for the tiny T5 tokenizer: caption-like words, so common prompts get short ids.
_T5_WORDS = """a an the of in on with and photo painting picture image drawing portrait landscape
cat dog bird horse car house tree flower person man woman child city street mountain river sea sky
red green blue yellow black white orange purple pink brown gray golden silver dark bright small large
style art artist oil watercolor sketch cartoon anime realistic detailed beautiful old new night day
sun moon star cloud rain snow fire water stone wood glass metal circle square triangle shape canvas
nude naked violence blood gun weapon fight war peace happy sad face eye hand body dress hat""".split()


@dataclass
class TinyConfig:
    """Widths and depths of the tiny models (denoisers small, text encoders at real depth)."""
    text_width: int = 32
    clip_l_layers: int = 12
    clip_g_layers: int = 32
    t5_blocks: int = 24
    t5_width: int = 32
    clip_max_length: int = 77


def t5_tokenizer(max_length: int = 512):
    """A small T5-style fast tokenizer trained locally (deterministic: fixed corpus, fixed settings)."""
    return _t5_tokenizer_cached(max_length)


@lru_cache(maxsize=4)
def _t5_tokenizer_cached(max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(_T5_WORDS)] * 4 + _T5_WORDS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def clip_tokenizer(tokenizer_dir=None, max_length: int = 77):
    return _clip_tokenizer_cached(str(tokenizer_dir) if tokenizer_dir else None, max_length)


@lru_cache(maxsize=4)
def _clip_tokenizer_cached(tokenizer_dir, max_length):
    from .clip_bpe import load_clip_tokenizer

    return load_clip_tokenizer(tokenizer_dir, max_length)


def _clip_config(cfg: TinyConfig, layers: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    kw = dict(hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width, num_hidden_layers=layers,
              num_attention_heads=4, max_position_embeddings=cfg.clip_max_length, vocab_size=49408,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")
    if projection:
        kw["projection_dim"] = projection
    return CLIPTextConfig(**kw)


def _t5(cfg: TinyConfig, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=cfg.t5_width, d_kv=8, d_ff=2 * cfg.t5_width,
                                   num_layers=cfg.t5_blocks, num_heads=4, relative_attention_num_buckets=8,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae(latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    kw = dict(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=latent_channels,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              norm_num_groups=2, sample_size=32)
    if flow:  # SD3 / FLUX VAEs: no quant convs, a shift factor
        kw.update(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return AutoencoderKL(**kw)


def _build_sd(cfg: TinyConfig, tokenizer_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    # SD 1.4's block layout: cross-attention in down 0-2 and up 1-3, 2 layers per block, a cross-attn mid block.
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=8, attention_head_dim=2, cross_attention_dim=cfg.text_width)
    te = CLIPTextModel(_clip_config(cfg, cfg.clip_l_layers))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=clip_tokenizer(tokenizer_dir, cfg.clip_max_length),
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _build_sdxl(cfg: TinyConfig, tokenizer_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    w = cfg.text_width
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + w, cross_attention_dim=2 * w, norm_num_groups=8)
    tok = clip_tokenizer(tokenizer_dir, cfg.clip_max_length)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_clip_config(cfg, cfg.clip_l_layers)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(cfg, cfg.clip_g_layers, projection=w)),
        tokenizer_2=tok, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)


def _build_sd3(cfg: TinyConfig, tokenizer_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    w = cfg.text_width
    t5_tok = t5_tokenizer()
    # SD3 pads the concatenated CLIP-L|CLIP-G embedding (2w) up to T5's width, so T5 must be >= 2w wide.
    t5cfg = TinyConfig(**{**cfg.__dict__, "t5_width": max(cfg.t5_width, 2 * w), "t5_blocks": min(cfg.t5_blocks, 4)})
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=t5cfg.t5_width,
                                        caption_projection_dim=32, pooled_projection_dim=2 * w, pos_embed_max_size=32)
    tok = clip_tokenizer(tokenizer_dir, cfg.clip_max_length)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(flow=True),
        text_encoder=CLIPTextModelWithProjection(_clip_config(cfg, cfg.clip_l_layers, projection=w)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(cfg, cfg.clip_g_layers, projection=w)), tokenizer_2=tok,
        text_encoder_3=_t5(t5cfg, len(t5_tok)), tokenizer_3=t5_tok)


def _build_flux(cfg: TinyConfig, tokenizer_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    t5_tok = t5_tokenizer()
    # FLUX packs 2x2 latent patches into tokens: in_channels = 4 * latent channels.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=cfg.t5_width,
                                         pooled_projection_dim=cfg.text_width, guidance_embeds=True,
                                         axes_dims_rope=[4, 4, 8])
    return FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                        vae=_vae(flow=True), text_encoder=CLIPTextModel(_clip_config(cfg, cfg.clip_l_layers)),
                        tokenizer=clip_tokenizer(tokenizer_dir, cfg.clip_max_length),
                        text_encoder_2=_t5(cfg, len(t5_tok)), tokenizer_2=t5_tok)


_BUILDERS = {"sd": _build_sd, "sdxl": _build_sdxl, "sd3": _build_sd3, "flux": _build_flux}


def build_tiny_pipeline(family: str, seed: int = 0, tokenizer_dir: str | Path | None = None,
                        config: TinyConfig | None = None):
    """A random-weight pipeline of `family` ("sd", "sdxl", "sd3", "flux"); `seed` fixes every weight.

    `tokenizer_dir` is where CLIP's vocab.json/merges.txt live (built on first use, see clip_bpe.py).
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline family {family!r}; choose one of {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[family](config or TinyConfig(), tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return pipe


_SHARED: dict[str, object] = {}


def shared_tiny_pipeline(family: str):
    """One cached `build_tiny_pipeline(family, seed=0)` per process (tests: don't modify it)."""
    if family not in _SHARED:
        _SHARED[family] = build_tiny_pipeline(family)
    return _SHARED[family]
