"""GPU cost of the interventions at the real models' sizes: seconds per image and peak CUDA memory.

SD 1.5 at 512x512 and SDXL base at 1024x1024, built from their published configurations with random
weights (diffusion_sae/models/realscale.py: nothing is downloaded) in float16 on one CUDA device,
DDIM / Euler `--steps` steps (default 50), guidance 7.5, batch 1. Three modes per model:

    plain     the pipeline alone
    steered   Concept Steerers: a 4x SAE (k = 32) on text_encoder layer 9, S built once, λ = -1
    ablated   SAeUron: a 16x BatchTopK-shaped SAE (k = 32) at the block the papers use
              (SD 1.5 up_blocks.1.attentions.1, SDXL up_blocks.0.attentions.1), top 8 features per step
    ablated_subset  the same edit through the CPU's path: it asks the device which rows fired (one host-device
              sync per step) and decodes those rows only; on a GPU `ablated` decodes every row without asking

SAEs are float32 on the GPU (their maths runs in fp32 inside the fp16 pipeline). Random weights
give the real architectures' cost, not meaningful images. Timings: `--images` timed images after one
warm-up round, the modes taken in turn image by image (round robin), torch.cuda.synchronize() around each
image; ratios of means and of medians; peak memory is torch.cuda.max_memory_allocated per mode (reset before
each image).

    python benchmarks/gpu.py [--models sd15,sdxl] [--steps 50] [--images 3] [--json gpu.json]
    python benchmarks/gpu.py --smoke      # the same code path on the tiny CPU pipelines (not a benchmark)

Without CUDA it prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusion_sae.eval.imageset import atomic_write_text  # noqa: E402

SETUPS = {  # family: (size, text hookpoint, block hookpoint)
    "sd15": (512, "text_encoder.text_model.encoder.layers.9", "unet.up_blocks.1.attentions.1"),
    "sdxl": (1024, "text_encoder.text_model.encoder.layers.9", "unet.up_blocks.0.attentions.1"),
}
TINY = {"sd15": "sd", "sdxl": "sdxl"}
MODES = ("plain", "steered", "ablated", "ablated_subset")
PROMPT = "a photo of a cat sitting on a wooden table"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_family(fam: str, device: torch.device, dtype: torch.dtype, steps: int, images: int, smoke: bool) -> dict:
    from diffusion_sae.concepts.dictionary import build_concept_dictionary
    from diffusion_sae.interventions.ablate import unlearn_concepts
    from diffusion_sae.interventions.steer import concept_steering, steer_text_encoder
    from diffusion_sae.models import resolve_hookpoint
    from diffusion_sae.sae import TopKSAE

    size, text_hp, block_hp = SETUPS[fam]
    t0 = time.perf_counter()
    if smoke:
        from diffusion_sae.models.tiny import build_tiny_pipeline

        from diffusion_sae.models.devices import place_pipeline

        pipe = build_tiny_pipeline(TINY[fam])
        place_pipeline(pipe, str(device), dtype)
        size = 32
        block_hp = "unet.up_blocks.1.attentions.1" if fam == "sd15" else "unet.up_blocks.0.attentions.1"
    else:
        from diffusion_sae.models.realscale import build_real_pipeline

        pipe = build_real_pipeline(fam, str(device), dtype=dtype)
    build_s = time.perf_counter() - t0
    tw, bw = resolve_hookpoint(pipe, text_hp).width, resolve_hookpoint(pipe, block_hp).width
    text_sae = TopKSAE(tw, 4 * tw, 32, seed=0, hookpoint=text_hp, device=device)
    block_sae = TopKSAE(bw, 16 * bw, 32, seed=1, hookpoint=block_hp, device=device)
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="pt")
    dictionary = build_concept_dictionary(pipe, block_sae, block_hp, {"cat": ["a cat"], "dog": ["a dog"]},
                                          steps=steps, guidance=7.5, height=size, width=size)
    steering = concept_steering(text_sae, pipe, text_hp, "cat", -1.0)

    import contextlib

    from diffusion_sae.interventions import ablate

    @contextlib.contextmanager
    def row_subset():
        # the scale edit's CPU path (asks the device which rows fired: one host-device sync per step), for comparison
        free = ablate._sync_free
        ablate._sync_free = lambda x: False
        try:
            with unlearn_concepts(pipe, block_sae, dictionary, "cat", multiplier=-1.0, top_n=8):
                yield
        finally:
            ablate._sync_free = free

    contexts = {"plain": contextlib.nullcontext,
                "steered": lambda: steer_text_encoder(pipe, [steering]),
                "ablated": lambda: unlearn_concepts(pipe, block_sae, dictionary, "cat", multiplier=-1.0, top_n=8),
                "ablated_subset": row_subset}
    times: dict = {m: [] for m in MODES}
    peak = {m: 0.0 for m in MODES}
    # Round robin: image i of every mode before image i + 1 of any, so the GPU's clock and the host's load drift
    # over all modes alike (one mode after another read plain 1.46 s and 1.94 s per image in two runs on one H200).
    for i in range(images + 1):
        for m in MODES:
            with contexts[m]():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                t = time.perf_counter()
                img = pipe(PROMPT, generator=torch.Generator().manual_seed(i), **kw).images
                _sync(device)
                if i:  # the first round warms up kernels and allocator
                    times[m].append(time.perf_counter() - t)
                if device.type == "cuda":
                    peak[m] = max(peak[m], torch.cuda.max_memory_allocated(device) / 2**30)
            assert img.shape[-1] == size
    res = {m: {"s_per_image": sum(times[m]) / len(times[m]), "median_s": sorted(times[m])[len(times[m]) // 2],
               "peak_gib": peak[m] if device.type == "cuda" else float("nan")} for m in MODES}
    for m in MODES[1:]:
        res[m]["ratio"] = res[m]["s_per_image"] / res["plain"]["s_per_image"]
        res[m]["median_ratio"] = res[m]["median_s"] / res["plain"]["median_s"]
    return {"size": size, "steps": steps, "build_s": build_s, "text_hookpoint": text_hp, "block_hookpoint": block_hp,
            "text_sae_latents": 4 * tw, "block_sae_latents": 16 * bw, **res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny pipelines on the CPU, 2 steps: checks the code path only")
    a = ap.parse_args(argv)
    if a.smoke:
        device, dtype, steps, images = torch.device("cpu"), torch.float32, 2, 1
    else:
        from diffusion_sae.models.devices import DeviceError, resolve_device

        try:
            device = resolve_device(a.device)
        except DeviceError as e:
            print(f"benchmarks/gpu.py needs a CUDA GPU: {str(e).split(';')[0]}; no GPU figure measured", file=sys.stderr)
            return 2
        if device.type != "cuda":
            print(f"benchmarks/gpu.py needs a CUDA GPU, got --device {a.device} ({device}); no figure measured",
                  file=sys.stderr)
            return 2
        dtype, steps, images = torch.float16, a.steps, a.images
    fams = [f.strip() for f in a.models.split(",") if f.strip()]
    bad = [f for f in fams if f not in SETUPS]
    if bad:
        print(f"--models: unknown {bad[0]!r}; choose from {', '.join(SETUPS)}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run, not a benchmark)"
    out = {"device": gpu, "dtype": str(dtype), "torch": torch.__version__, "results": {}}
    print(f"{gpu}, {dtype}, {steps} steps, {images} timed image(s) per mode")
    print(f"{'model':6s} {'size':>6s} {'mode':14s} {'s/image':>9s} {'x plain':>8s} {'median x':>9s} {'peak GiB':>9s}")
    for fam in fams:
        r = bench_family(fam, device, dtype, steps, images, a.smoke)
        out["results"][fam] = r
        for m in MODES:
            print(f"{fam:6s} {r['size']:>5d}² {m:14s} {r[m]['s_per_image']:9.3f} {r[m].get('ratio', 1.0):8.3f} "
                  f"{r[m].get('median_ratio', 1.0):9.3f} {r[m]['peak_gib']:9.2f}")
    if a.json:
        atomic_write_text(Path(a.json), json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
