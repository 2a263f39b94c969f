"""Which component makes a tiny pipeline's bfloat16 image differ from its float32 one (a diagnostic, not a benchmark).

`tests/test_devices.py::test_steer_and_unlearn_in_bf16_match_fp32` holds the plain bf16 image of each tiny family
within 0.01 (mean per pixel, images in [0, 1]) of the float32 one. On this project's pinned CPU stack it holds; on an
H200 with torch 2.11 it held for SD but not for SDXL (0.20), SD3 (0.10) and FLUX (0.16). This script runs each family
in float32, then with one component at a time in bfloat16 (its inputs cast to bf16 on the way in and its outputs back
to float32 on the way out, everything else float32), then all of it in bf16, and prints the mean pixel difference
from float32 for each: the component whose row carries the difference is the one to look at.

    python benchmarks/bf16_components.py [--families sd,sdxl,sd3,flux] [--device cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusion_sae.eval.imageset import atomic_write_text  # noqa: E402

FAMILIES = ("sd", "sdxl", "sd3", "flux")


def cast_floats(obj, dtype: torch.dtype):
    """obj with every floating tensor inside it (tuples, lists, dicts, diffusers/transformers outputs) cast."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):  # transformers' ModelOutput is an OrderedDict whose fields are also attributes
        for k in list(obj.keys()):
            obj[k] = cast_floats(obj[k], dtype)
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, cast_floats(getattr(obj, f.name), dtype))
        return obj
    return obj


def image(pipe, device) -> torch.Tensor:
    g = 3.5 if "Flux" in type(pipe).__name__ else 5.0
    return pipe("a cat", num_inference_steps=2, guidance_scale=g, generator=torch.Generator().manual_seed(0),
                output_type="pt", height=32, width=32).images.float().cpu()


def _wrap_method(module, name: str, dtype_in: torch.dtype, dtype_out: torch.dtype):
    """Replace module.<name> (e.g. the VAE's decode, which the pipeline calls instead of forward) on the instance
    by one that casts its inputs and outputs; returns the undo."""
    orig = getattr(module, name)

    def wrapped(*args, **kwargs):
        return cast_floats(orig(*cast_floats(args, dtype_in), **cast_floats(kwargs, dtype_in)), dtype_out)
    setattr(module, name, wrapped)
    return lambda: delattr(module, name)


def one_in_bf16(pipe, name: str):
    """Cast pipe's component `name` to bf16 with its inputs cast to bf16 and its outputs back to float32; every other
    module casts what it takes to float32 (pipelines cast embeddings to a text encoder's dtype before the denoiser
    sees them). Returns the undo."""
    undo = []
    for other, comp in pipe.components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        dt = torch.bfloat16 if other == name else torch.float32
        comp.to(dt)
        pre = comp.register_forward_pre_hook(
            lambda m, args, kwargs, dt=dt: (cast_floats(args, dt), cast_floats(kwargs, dt)), with_kwargs=True)
        undo.append(pre.remove)
        if other == name:
            post = comp.register_forward_hook(lambda m, args, out: cast_floats(out, torch.float32))
            undo.append(post.remove)
        if hasattr(getattr(comp, "config", None), "latent_channels"):  # a VAE: the pipeline calls decode()
            undo.append(_wrap_method(comp, "decode", dt, torch.float32))

    def run_undo():
        for u in reversed(undo):
            u()
        pipe.components[name].to(torch.float32)
    return run_undo


def diagnose(family: str, device: str) -> dict:
    from diffusion_sae.models.loading import load_pipeline

    pipe = load_pipeline(f"tiny:{family}", device=device, dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    ref = image(pipe, device)
    rows = {}
    for name, comp in pipe.components.items():
        if not isinstance(comp, torch.nn.Module) or not any(True for _ in comp.parameters()):
            continue
        undo = one_in_bf16(pipe, name)
        try:
            rows[name] = (image(pipe, device) - ref).abs().mean().item()
        except Exception as e:  # a component that cannot run alone in bf16: say so, keep going
            rows[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        finally:
            undo()
    whole = load_pipeline(f"tiny:{family}", device=device, dtype="bfloat16")
    whole.set_progress_bar_config(disable=True)
    rows["all (bf16 pipeline)"] = (image(whole, device) - ref).abs().mean().item()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    fams = [f.strip() for f in a.families.split(",") if f.strip()]
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        print(f"--families: unknown {bad[0]!r}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    import transformers

    import diffusers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}, "
          f"device {a.device}")
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
           "device": a.device, "families": {}}
    for fam in fams:
        rows = diagnose(fam, a.device)
        out["families"][fam] = rows
        for name, v in rows.items():
            print(f"{fam:5s} {name:22s} " + (f"{v:.4f}" if isinstance(v, float) else v))
    if a.json:
        atomic_write_text(Path(a.json), json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
