"""Text-encoder layer outputs for a list of prompts, encoded by the pipeline's own `encode_prompt`.

Below concepts/ and interventions/ (both read text-encoder layers: feature statistics, steering
matrices), so neither imports the other for it.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from .hookpoints import HookpointError, register_edit, resolve_hookpoint


def pipeline_family(pipe) -> str:
    """"flux", "sd3", "sdxl" or "sd", from the pipeline class name (their encode_prompt signatures differ)."""
    name = type(pipe).__name__
    if "Flux" in name:
        return "flux"
    if "StableDiffusion3" in name:
        return "sd3"
    if "XL" in name:
        return "sdxl"
    return "sd"


def split_hookpoints(hookpoint: str | list[str]) -> list[str]:
    """"a+b" or ["a", "b"] -> ["a", "b"] (SDXL's two text encoders are read together)."""
    return list(hookpoint) if isinstance(hookpoint, (list, tuple)) else [h.strip() for h in hookpoint.split("+")]


@contextlib.contextmanager
def capture_outputs(hps):
    """Record the output tensor of each hookpoint's module during the block (an edit that edits nothing)."""
    got: dict[int, torch.Tensor] = {}
    handles = []
    for i, hp in enumerate(hps):
        def record(h, i=i):
            got[i] = h.detach()
            return h
        handles.append(register_edit(dataclasses.replace(hp, read="output"), record, "diffusion_sae.capture"))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def encode_prompts(pipe, prompts: list[str]):
    """Run the pipeline's own encode_prompt on prompts (no guidance branch)."""
    fam = pipeline_family(pipe)
    dev = pipe._execution_device
    if fam == "flux":
        return pipe.encode_prompt(prompts, prompt_2=None, device=dev, num_images_per_prompt=1)
    if fam == "sd3":
        return pipe.encode_prompt(prompts, None, None, device=dev, num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)
    return pipe.encode_prompt(prompts, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=False)


@torch.no_grad()
def layer_activations(pipe, hookpoint: str | list[str], prompts: list[str], hps=None,
                      error: type[Exception] = HookpointError) -> torch.Tensor:
    """[N, T, d] outputs of the named text-encoder layer(s) for prompts, as the pipeline tokenizes them.

    `hps`: the resolved hookpoints when the caller has checked them already; `error`: the exception
    type raised when a layer does not run (the caller's own, e.g. SteeringError).
    """
    names = split_hookpoints(hookpoint)
    if hps is None:
        hps = [resolve_hookpoint(pipe, n) for n in names]
        bad = [hp for hp in hps if hp.kind != "text"]
        if bad:
            raise error(f"hookpoint {bad[0].name!r} is not in a text encoder (it is in {bad[0].component})")
    with capture_outputs(hps) as got:
        encode_prompts(pipe, prompts)
    missing = [names[i] for i in range(len(hps)) if i not in got]
    if missing:
        raise error(f"layer {missing[0]!r} was not run when encoding the prompt "
                    f"(pipeline {type(pipe).__name__} does not use it)")
    return torch.cat([got[i] for i in range(len(hps))], dim=-1)
