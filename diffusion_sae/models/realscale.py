"""The real pipelines' architectures, built from their published configurations (written here, never
downloaded) with random weights or on the meta device, for dry runs and the hookpoint table.

Configurations are the `config.json` values of the public checkpoints:
  sd15  runwayml/stable-diffusion-v1-5: UNet2DConditionModel (320/640/1280/1280, cross-attention 768),
        CLIP ViT-L/14 text encoder (openai/clip-vit-large-patch14: 12 layers, width 768), the SD VAE
  sdxl  stabilityai/stable-diffusion-xl-base-1.0: UNet (320/640/1280, transformer depths 1/2/10,
        cross-attention 2048), CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 (32 layers, width 1280)
  sd3   stabilityai/stable-diffusion-3-medium-diffusers: SD3Transformer2DModel (24 joint blocks, width
        1536), CLIP-L + CLIP-G + T5-XXL encoder (24 blocks, width 4096)
  flux  black-forest-labs/FLUX.1-dev: FluxTransformer2DModel (19 double + 38 single blocks, width
        3072), CLIP-L + T5-XXL

`build_real_pipeline(family, device="meta")` costs no memory (hookpoints, widths); `device="cpu"`
materialises random weights (normal, std 1/sqrt(fan_in); norms 1, biases 0), e.g. SD 1.5 is
~1.07 B parameters = 4.3 GB in float32. `blocks=` shortens the SD3 / FLUX transformers, T5 and SDXL's
transformer depths (the widths stay real). Run `python -m diffusion_sae.models.realscale hookpoints docs/hookpoints.md` to
regenerate the hookpoint table, `python -m diffusion_sae.models.realscale dry-run` for the SD 1.5
dry run (collect → train → dictionary → steer and unlearn) with its timings and peak memory.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

REAL_FAMILIES = ("sd15", "sdxl", "sd3", "flux")
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
                 downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, act_fn="silu")
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD3_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
               scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)


def _materialise(module: torch.nn.Module, seed: int, device="cpu", dtype=torch.float32) -> torch.nn.Module:
    """Replace meta parameters by random ones: weights N(0, 1/fan_in), 1-d weights (norms) 1, biases 0,
    created directly on `device` in `dtype` (a GPU never holds a float32 copy)."""
    gen = torch.Generator(device).manual_seed(seed)
    for name, sub in module.named_modules():
        for pname, p in list(sub._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if p.ndim == 1:
                t.fill_(1.0 if pname == "weight" else 0.0)
            else:
                fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
                if "embed" in f"{name}.{pname}" and p.ndim == 2 and fan_in < 64:
                    fan_in = 1
                t.normal_(0.0, 1.0 / math.sqrt(max(fan_in, 1)), generator=gen)
            sub._parameters[pname] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
    return module


_DTYPE = torch.float32  # set by build_real_pipeline for the modules it makes


def _make(cls, cfg: dict, device: str, seed: int):
    from accelerate import init_empty_weights

    with init_empty_weights():
        m = cls(cfg) if not isinstance(cfg, dict) else cls(**cfg)
    if device != "meta":
        _materialise(m, seed, device, _DTYPE)
        m.to(device)  # buffers (position ids, ...) follow the weights
    return m.eval()


def _clip(kw: dict, projection: bool, device: str, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return _make(CLIPTextModelWithProjection if projection else CLIPTextModel, CLIPTextConfig(**kw), device, seed)


def _t5(device: str, seed: int, blocks: int | None):
    from transformers import T5Config, T5EncoderModel

    return _make(T5EncoderModel, T5Config(**{**T5_XXL, "num_layers": blocks or T5_XXL["num_layers"]}), device, seed)


def build_real_pipeline(family: str, device: str = "meta", seed: int = 0, blocks: int | None = None,
                        dtype: torch.dtype = torch.float32):
    """A pipeline of `family` (REAL_FAMILIES) at the real configuration, on meta or with random weights
    made on `device` ("cpu", "cuda", "cuda:N") in `dtype`."""
    global _DTYPE
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)

    from .tiny import clip_tokenizer, t5_tokenizer

    if family not in REAL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(REAL_FAMILIES)}")
    _DTYPE = dtype
    tok = clip_tokenizer()
    s = iter(range(seed, seed + 100))
    if family == "sd15":
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=_make(AutoencoderKL, SD_VAE, device, next(s)),
                                       text_encoder=_clip(CLIP_L, False, device, next(s)), tokenizer=tok,
                                       unet=_make(UNet2DConditionModel, SD15_UNET, device, next(s)), scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
        pipe = StableDiffusionXLPipeline(vae=_make(AutoencoderKL, dict(SD_VAE, sample_size=1024, scaling_factor=0.13025),
                                                   device, next(s)),
                                         text_encoder=_clip(CLIP_L, False, device, next(s)), tokenizer=tok,
                                         text_encoder_2=_clip(CLIP_G, True, device, next(s)), tokenizer_2=tok,
                                         unet=_make(UNet2DConditionModel, dict(SDXL_UNET, **(
                                             {"transformer_layers_per_block": (1, min(2, blocks), blocks)} if blocks else {})),
                                             device, next(s)), scheduler=sched)
    elif family == "sd3":
        cfg = dict(SD3_TRANSFORMER, num_layers=blocks or SD3_TRANSFORMER["num_layers"])
        pipe = StableDiffusion3Pipeline(
            transformer=_make(SD3Transformer2DModel, cfg, device, next(s)),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_make(AutoencoderKL, SD3_VAE, device, next(s)),
            text_encoder=_clip(CLIP_L, True, device, next(s)), tokenizer=tok,
            text_encoder_2=_clip(CLIP_G, True, device, next(s)), tokenizer_2=tok,
            text_encoder_3=_t5(device, next(s), blocks), tokenizer_3=t5_tokenizer())
    else:
        cfg = dict(FLUX_TRANSFORMER)
        if blocks:
            cfg.update(num_layers=blocks, num_single_layers=blocks)
        pipe = FluxPipeline(transformer=_make(FluxTransformer2DModel, cfg, device, next(s)),
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                            vae=_make(AutoencoderKL, FLUX_VAE, device, next(s)),
                            text_encoder=_clip(CLIP_L, False, device, next(s)), tokenizer=tok,
                            text_encoder_2=_t5(device, next(s), blocks), tokenizer_2=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------ hookpoint table
_TITLES = {"sd15": "SD 1.x (1.4 / 1.5)", "sdxl": "SDXL base 1.0", "sd3": "SD3 medium", "flux": "FLUX.1 [dev]"}


def _ranges(names: list[str]) -> list[str]:
    """Collapse `x.layers.0 … x.layers.31` into `x.layers.{0..31}` (same prefix, consecutive indices)."""
    out, i = [], 0
    while i < len(names):
        head, _, last = names[i].rpartition(".")
        j = i
        if last.isdigit():
            while (j + 1 < len(names) and names[j + 1].rpartition(".")[0] == head
                   and names[j + 1].rpartition(".")[2] == str(int(last) + (j + 1 - i))):
                j += 1
        out.append(names[i] if j == i else f"{head}.{{{last}..{names[j].rpartition('.')[2]}}}")
        i = j + 1
    return out


def hookpoints_markdown() -> str:
    """The table of every registered hookpoint (output read mode) of each real family, with widths."""
    from .hookpoints import list_hookpoints, resolve_hookpoint

    lines = ["# Hookpoints of the real pipelines", "",
             "Generated by `python -m diffusion_sae.models.realscale hookpoints docs/hookpoints.md` from the",
             "published configurations (built on the meta device: no weights). Every name also takes the",
             "`:input` and `:update` read modes. Width = the SAE's `d_in` at that hookpoint.", ""]
    for fam in REAL_FAMILIES:
        pipe = build_real_pipeline(fam, "meta")
        lines += [f"## {_TITLES[fam]} (`{type(pipe).__name__}`)", "", "| hookpoint | kind | width |", "|---|---|---|"]
        for kind in ("text", "denoiser"):
            names = list_hookpoints(pipe, kind)
            rows = []
            for n in names:
                w = resolve_hookpoint(pipe, n).width
                if rows and rows[-1][1] == w and rows[-1][0][-1].rpartition(".")[0] == n.rpartition(".")[0]:
                    rows[-1][0].append(n)
                else:
                    rows.append(([n], w))
            for ns, w in rows:
                for r in _ranges(ns):
                    lines.append(f"| `{r}` | {kind} | {w if w is not None else '?'} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ dry run
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# family: (block hookpoint, block SAE expansion, blocks kept) for the dry runs; text SAE: CLIP-L layer 9 (4x).
DRY_RUN = {"sd15": ("unet.up_blocks.1.attentions.1", 16, None),
           "sdxl": ("unet.up_blocks.0.attentions.1", 16, 1),
           "sd3": ("transformer.transformer_blocks.0", 16, 2),
           "flux": ("transformer.single_transformer_blocks.0", 4, 1)}


def dry_run(out: str | Path, dtype: str = "float32", steps: int = 2, size: int = 64, seed: int = 0,
            family: str = "sd15") -> dict:
    """A real-width pipeline with random weights on the CPU: collect (1 prompt, `steps` steps, size²) →
    train a block SAE and a text SAE for a few steps → concept dictionary → steer and unlearn.
    SD 1.5 is complete; SDXL keeps one transformer layer per block (its real 1/2/10 depths cost 10 GB
    in fp32), SD3 two joint blocks and two T5 blocks, FLUX one block of each kind and one T5 block
    (widths stay real).
    Returns shapes, dtypes, seconds per stage and the process's peak resident memory."""
    from dataclasses import replace

    from ..activations.prompts import PromptSet
    from ..concepts.dictionary import build_concept_dictionary
    from ..interventions.ablate import unlearn_concepts
    from ..interventions.steer import concept_steering, steer_text_encoder
    from ..sae.recipes import BLOCK_DEFAULTS, TEXT_DEFAULTS, train_block_sae, train_text_sae
    from .devices import place_pipeline

    out = Path(out)
    t, rep = time.perf_counter(), {"dtype": dtype, "steps": steps, "size": size}

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        rep.setdefault("seconds", {})[name] = round(now - t, 2)
        t = now

    from .devices import parse_dtype

    block, expansion, blocks = DRY_RUN[family]
    rep["family"] = family
    pipe = build_real_pipeline(family, "cpu", seed=seed, blocks=blocks, dtype=parse_dtype(dtype) or torch.float32)
    pl = place_pipeline(pipe, "cpu", dtype, "none")
    rep["parameters"] = {c: sum(p.numel() for p in m.parameters()) for c, m in pipe.components.items()
                         if isinstance(m, torch.nn.Module)}
    lap("build")
    text = "text_encoder.text_model.encoder.layers.9"
    ps = PromptSet.from_list(["a photo of a cat"], seeds=[seed])
    bsae = train_block_sae(pipe, ps, out / "block", hookpoint=block, train_progress=False,
                           recipe=replace(BLOCK_DEFAULTS, steps=steps, height=size, width=size, batch_size=4,
                                          batch_prompts=1, guidance=7.5, expansion=expansion))
    lap("collect+train block SAE")
    tsae = train_text_sae(pipe, ps, out / "text", layer=9, train_progress=False,
                          recipe=replace(TEXT_DEFAULTS, batch_size=32, batch_prompts=1))
    lap("collect+train text SAE")
    rep["block_sae"] = {"W_dec": list(bsae.W_dec.shape), "dtype": str(bsae.dtype), "k": bsae.cfg.k,
                        "tokens": bsae.train_metrics.get("tokens"), "steps": bsae.train_metrics.get("steps")}
    rep["text_sae"] = {"W_dec": list(tsae.W_dec.shape), "dtype": str(tsae.dtype),
                       "tokens": tsae.train_metrics.get("tokens"), "steps": tsae.train_metrics.get("steps")}
    g = 3.5 if family == "flux" else 7.5
    kw = dict(num_inference_steps=steps, guidance_scale=g, height=size, width=size, output_type="pt")
    d = build_concept_dictionary(pipe, bsae, block, {"cat": ["a cat"], "dog": ["a dog"]}, steps=steps, guidance=g,
                                 height=size, width=size)
    rep["dictionary"] = list(d.means.shape)
    lap("concept dictionary")

    def gen():
        return pipe("a photo of a cat", generator=torch.Generator().manual_seed(seed), **kw).images

    plain = gen()
    with steer_text_encoder(pipe, [concept_steering(tsae, pipe, text, "cat", -2.0)]):
        steered = gen()
    with unlearn_concepts(pipe, bsae, d, "cat", multiplier=-30.0, top_n=8):
        unlearned = gen()
    lap("plain+steer+unlearn images")
    rep["image"] = {"shape": list(plain.shape), "dtype": str(plain.dtype),
                    "pipeline_dtype": str((getattr(pipe, "unet", None) or pipe.transformer).dtype),
                    "device": str(pl.device),
                    "finite": bool(torch.isfinite(plain).all() and torch.isfinite(steered).all()
                                   and torch.isfinite(unlearned).all()),
                    "steer_max_change": float((steered.float() - plain.float()).abs().max()),
                    "unlearn_max_change": float((unlearned.float() - plain.float()).abs().max())}
    rep["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return rep


def main(argv=None) -> None:
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m diffusion_sae.models.realscale")
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hookpoints", help="write the hookpoint table (Markdown)")
    h.add_argument("out", nargs="?", default="docs/hookpoints.md")
    d = sub.add_parser("dry-run", help="a real-width pipeline, random weights, CPU")
    d.add_argument("--family", default="sd15", choices=list(DRY_RUN))
    d.add_argument("--dtype", default="float32")
    d.add_argument("--steps", type=int, default=2)
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "hookpoints":
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(hookpoints_markdown() + "\n")
        print(f"wrote {a.out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        rep = dry_run(tmp, dtype=a.dtype, steps=a.steps, size=a.size, family=a.family)
    text = json.dumps(rep, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
