"""Inference cost of the interventions, measured in one run (the papers' Table 4 in miniature).

1. Bundled ShapesCanvas pipeline, 4 images x 25 steps: plain vs Concept Steerers (S built once per
   concept; the paper's ungated S, and the shipped FamilyGate removal with its embedding word matcher, with
   and without its per-position feature ablation; target <= 1.01x) vs SAeUron (the shipped block-output
   edits: one style at one block, and the costliest object preset, triangle: four blocks, 128 features;
   target <= 1.3x; and gradient, whose preset adds a second edit at two further blocks) — seconds per image and
   ratios.
2. An SD 1.5-size UNet built from config (random weights, 64x64 latents, 2 DDIM steps, guidance on)
   with a 20,480-latent SAE at up_blocks.1.attentions.1: the paper's ablation and the shipped edit
   (latent scaling, per-patch specific selection, evidence gate) / plain (target <= 1.03x) and the
   memory overhead.
3. Rewind (--rewind N): the shipped Concept Steerers removal of square (its preset redoes the probe-flagged
   samples from step 0) on N implicit and N empty tuning prompts, generated through `ds.generate` against the same
   preset without the rewind (`pipe(...)`), and the share of samples redone: the rewind's cost on the prompts it
   exists for (on prompts its probe does not flag it costs nothing).

    python benchmarks/interventions.py [--skip-sd15] [--repeats 3] [--rewind 32]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusion_sae.eval.cost import time_generation  # noqa: E402


def bundled(repeats: int) -> None:
    from diffusion_sae.eval.shapes import removal_steering, saeuron_context, steer_strength
    from diffusion_sae.interventions.steer import concept_steering, steer_text_encoder
    from diffusion_sae.world import assets, bundle

    pipe = assets.load_pipeline()
    prompts = ["a red triangle in striped style", "a blue ring in dotted style", "a green heart in wavy style",
               "an orange arrow in solid style"]

    def gen():
        return pipe(prompts, num_inference_steps=25, guidance_scale=bundle.GUIDANCE,
                    generator=[torch.Generator().manual_seed(i) for i in range(4)], output_type="pt")

    params = bundle.load_params()
    text_sae = bundle.load_text_sae()
    st = concept_steering(text_sae, pipe, bundle.TEXT_HOOKPOINT, "striped style", -1.0)
    # the shipped removal: gated on the word, S from contrastive example prompts (built once, here)
    st_shipped = removal_steering(text_sae, pipe, "style", "striped", steer_strength(params["steer"], "style", "striped"),
                                  params["steer"])
    style_blocks = bundle.load_blocks("style", params["saeuron"]["dotted"]["blocks"])
    # triangle: the costliest object preset (all four object blocks, 128 features)
    object_blocks = bundle.load_blocks("object", params["saeuron"]["triangle"]["blocks"])

    def steered():
        with steer_text_encoder(pipe, st):
            return gen()

    def steered_shipped():
        with steer_text_encoder(pipe, st_shipped):
            return gen()

    # the same removal without its per-position feature ablation (the text SAE's encode at every text-encoder call)
    st_no_ablation = copy.copy(st_shipped)
    st_no_ablation.ablation = None

    def steered_no_ablation():
        with steer_text_encoder(pipe, st_no_ablation):
            return gen()

    def unlearned_style():  # the shipped SAeUron edit of one style (block-output SAE(s) its preset names)
        with saeuron_context(pipe, style_blocks, {"dotted": params["saeuron"]["dotted"]}):
            return gen()

    def unlearned_object():  # the same for one object (its preset edits four blocks)
        with saeuron_context(pipe, object_blocks, {"triangle": params["saeuron"]["triangle"]}):
            return gen()

    # gradient: a main edit at one block and an extra edit at both up_blocks.0 attentions, which acts on every prompt
    # that does not ask for gradient (all four here): three block SAEs on every sample
    grad = params["saeuron"]["gradient"]
    grad_blocks = bundle.load_blocks("style", list(dict.fromkeys(
        [*grad["blocks"], *(b for e in grad.get("extra_edits", []) for b in e["blocks"])])))

    def unlearned_gradient():
        with saeuron_context(pipe, grad_blocks, {"gradient": grad}):
            return gen()

    # Interleave the runs so that machine noise hits every variant alike.
    fns = {"plain": gen, "steered-paper": steered, "steered-shipped": steered_shipped, "shipped-no-ablat": steered_no_ablation,
           "saeuron-style": unlearned_style, "saeuron-object": unlearned_object, "saeuron-gradient": unlearned_gradient}
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(time_generation(f, repeats=1, warmup=0, images_per_call=4).per_image_s)
    best = {k: min(v) for k, v in times.items()}
    print(f"bundled ShapesCanvas pipeline, 4 images x 25 steps, guidance {bundle.GUIDANCE:g} (best of {repeats})")
    print(f"  {'generation':16s} {'s/image':>9s} {'ratio':>7s}")
    for k, v in best.items():
        print(f"  {k:16s} {v:9.4f} {v / best['plain']:7.3f}x")
    print(f"  targets: steered <= 1.01x, saeuron <= 1.3x; 4 images in < 2 s (plain: {4 * best['plain']:.2f} s)")


def sd15(repeats: int) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion_sae.concepts.dictionary import ConceptDictionary
    from diffusion_sae.interventions.ablate import unlearn_concepts
    from diffusion_sae.sae import TopKSAE
    from diffusion_sae.world.tokenizer import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5 layout
    tok = build_tokenizer(max_length=77)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
                                      num_attention_heads=12, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    from diffusion_sae.world.model import PixelShuffleVAE
    vae = PixelShuffleVAE(factor=8, in_channels=3, latent_channels=192, block_out_channels=(1, 1, 1, 1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    n_params = sum(p.numel() for p in unet.parameters())
    hp = "unet.up_blocks.1.attentions.1"
    sae = TopKSAE(1280, 20480, 32)
    pipe.scheduler.set_timesteps(2)
    steps = [float(t) for t in pipe.scheduler.timesteps]
    means = torch.rand(2, 2, 20480) * 0.1
    d = ConceptDictionary(hp, ["target", "other"], means, [1, 1], steps, {"scheduler": "DDIMScheduler"},
                          bars=torch.rand(2, 2, 20480) * 0.1, excess=torch.rand(2, 2, 20480) * 0.1)

    def gen():
        return pipe("a photo", num_inference_steps=2, guidance_scale=7.5, height=512, width=512,
                    generator=torch.Generator().manual_seed(0), output_type="latent")

    def ablated():
        with unlearn_concepts(pipe, sae, d, "target", multiplier=-1.0, top_n=3):
            return gen()

    def shipped():  # the shipped edit's options (ShapesCanvas presets): latent scaling, specific selection, gate
        with unlearn_concepts(pipe, sae, d, "target", multiplier=-2.0, top_n=16, scaling="latent",
                              selection="specific", min_fire=3):
            return gen()

    gen()
    ablated()
    shipped()
    plain_t, abl_t, ship_t = [], [], []
    for _ in range(repeats):
        plain_t.append(time_generation(gen, repeats=1, warmup=0))
        abl_t.append(time_generation(ablated, repeats=1, warmup=0))
        ship_t.append(time_generation(shipped, repeats=1, warmup=0))
    p = min(t.mean_s for t in plain_t)
    a = min(t.mean_s for t in abl_t)
    sh = min(t.mean_s for t in ship_t)
    mem = max(t.peak_memory_bytes for t in abl_t) - max(t.peak_memory_bytes for t in plain_t)
    sae_mb = sum(x.numel() * x.element_size() for x in sae.state_dict().values()) / 2**20
    print(f"SD 1.5-size UNet ({n_params / 1e6:.0f} M params), 64x64 latents, 2 DDIM steps, CFG, "
          f"SAE 1280 -> 20480 (k=32) at {hp} (best of {repeats})")
    print(f"  plain    {p:8.2f} s")
    print(f"  ablated  {a:8.2f} s   ratio {a / p:.3f}x (paper's selection; target <= 1.03x)")
    print(f"  shipped  {sh:8.2f} s   ratio {sh / p:.3f}x (specific selection + evidence gate; target <= 1.03x)")
    print(f"  peak RSS overhead during generation: {mem / 2**20:+.0f} MiB; SAE weights {sae_mb:.0f} MiB, "
          f"dictionary {means.numel() * 4 / 2**20:.1f} MiB")


def rewind_cost(n: int, repeats: int) -> None:
    from diffusion_sae.eval.shapes import removal_steering, steer_strength
    from diffusion_sae.interventions.rewind import ACTIVE_GATES, generate
    from diffusion_sae.interventions.steer import steer_text_encoder
    from diffusion_sae.world import assets, bundle
    from diffusion_sae.world.generalization import empty_prompts, implicit_prompts

    pipe = assets.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    params = bundle.load_params()["steer"]
    rows = [(p, seed) for ps in (implicit_prompts("object", n, "tuning"), empty_prompts(n, "tuning"))
            for p, seed in zip(ps.prompts, ps.seeds)]
    st = removal_steering(bundle.load_text_sae(), pipe, "object", "square",
                          steer_strength(params, "object", "square"), params)
    assert st.rows.rewind, "the shipped square preset has no rewind"
    redone = []

    def gated(p, prompt, **kw):
        return p(prompt, **kw)

    def run(fn):
        def call():
            with steer_text_encoder(pipe, st):
                for i in range(0, len(rows), 16):
                    chunk = rows[i:i + 16]
                    fn(pipe, [p for p, _ in chunk], num_inference_steps=25, guidance_scale=bundle.GUIDANCE,
                       generator=[torch.Generator().manual_seed(seed) for _, seed in chunk], output_type="pt")
                    # the gated pass's verdicts are the first pass of generate's (after generate they are its
                    # second pass's)
                    flags = ACTIVE_GATES[pipe][0].rewind_rows()[0]
                    if fn is gated:
                        redone.append(0.0 if flags is None else float(flags.float().mean()))
        return call

    runs = {"gated (no rewind)": run(gated), "rewind": run(generate)}
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            times[k].append(time_generation(f, repeats=1, warmup=0, images_per_call=len(rows)).per_image_s)
    best = {k: min(v) for k, v in times.items()}
    print(f"rewind: Concept Steerers' shipped square removal, {n} implicit + {n} empty tuning prompts, 25 steps "
          f"(best of {repeats}); {100 * sum(redone) / max(len(redone), 1):.0f} % of samples redone")
    for k, v in best.items():
        print(f"  {k:18s} {v:9.4f} s/image {v / best['gated (no rewind)']:7.3f}x")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--rewind", type=int, default=0, help="also time the rewind on N implicit + N empty prompts")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bundled(a.repeats)
    if a.rewind:
        rewind_cost(a.rewind, a.repeats)
    if not a.skip_sd15:
        sd15(a.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
