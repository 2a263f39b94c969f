"""Rewind: redo the samples a late detector flagged, with the edit from its first step.

A per-sample gate (`ConceptEdit.detector`) edits a sample only after its detector has flagged it. An image-side
probe is reliable late (it sees what the image is turning into) but a concept's layout is decided early, so an
edit that starts after a late verdict often cannot undo it. Rewinding decouples the two: generate once with the
gate, then denoise every sample that a rewinding edit's detectors flagged only after the edit's first step again
from its own first latent, with that edit active from its first step, and put the new image in its place. A
sample its gate flagged early (a probe of the prompt's branch at step 0) already got the whole edit and is not
redone, nor is any sample no detector flagged, so they stay exactly the gated generation's images.

The same holds for Concept Steerers' probe-gated implicit fraction (`FamilyGate(detector=..., rewind=True)` in
`steer_text_encoder`): a flagged sample is redone with the encoding it got from the gate's step on (the implicit
fraction) from the first step.

This needs a second pipeline call, which a hook cannot make: generate with `generate(pipe, prompt, ...)` instead
of `pipe(prompt, ...)` inside `unlearn_concepts` / `steer_text_encoder` (plain `pipe(...)` gives the gated images,
no rewind). The
initial noise of a redone sample must be the same as in the first pass, so `generator` must be one
`torch.Generator` per image (their states are saved before the first pass), or `latents` must be given.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from ..errors import DiffusionSAEError

# The rewindable gates open on each pipeline: every open `unlearn_concepts` context's SampleVerdicts and every
# `steer_text_encoder` context's detector-gated encodings. Each has `rewind_rows()` (per part: None, or the
# samples of the last generation to redo, bool [samples]) and `forced` (per part: None, or the samples to edit
# from the first step during the second pass, whatever the detectors say).
ACTIVE_GATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# Per-sample tensor arguments of the diffusers text-to-image pipelines: the second pass takes their rows.
_ROW_KWARGS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
               "latents")


class RewindError(DiffusionSAEError, ValueError):
    """A generation that cannot be rewound as asked (one line)."""


@contextlib.contextmanager
def open_gate(pipe, gate):
    """Within the block, `generate(pipe, ...)` reads and forces `gate` (see ACTIVE_GATES)."""
    ACTIVE_GATES.setdefault(pipe, []).append(gate)
    try:
        yield gate
    finally:
        active = ACTIVE_GATES.get(pipe, [])
        if gate in active:
            active.remove(gate)
        if not active:
            ACTIVE_GATES.pop(pipe, None)


def _rewinding(pipe) -> list:
    return [v for v in ACTIVE_GATES.get(pipe, []) if v.rewinds]


def _per_sample(value, n_prompts: int, per_prompt: int, name: str):
    """A prompt argument (str or list of n_prompts) as one entry per image."""
    if value is None or isinstance(value, str):
        return [value] * (n_prompts * per_prompt)
    value = list(value)
    if len(value) != n_prompts:
        raise RewindError(f"rewind: {name} has {len(value)} entries for {n_prompts} prompts")
    return [v for v in value for _ in range(per_prompt)]


def _take(images, rows: list[int]):
    return images[rows] if isinstance(images, torch.Tensor) or hasattr(images, "shape") else [images[i] for i in rows]


def _put(images, rows: list[int], new):
    if isinstance(images, torch.Tensor):
        out = images.clone()
        out[rows] = new.to(out.device, out.dtype)
        return out
    if hasattr(images, "shape"):           # numpy
        out = images.copy()
        out[rows] = new
        return out
    out = list(images)
    for j, i in enumerate(rows):
        out[i] = new[j]
    return out


def generate(pipe, prompt=None, **kwargs):
    """`pipe(prompt, **kwargs)`, then the rewind of every open `unlearn_concepts` edit with `rewind=True` and of
    every open `steer_text_encoder` FamilyGate with `rewind=True`.

    Returns the pipeline's output with the redone samples' images in place (the same type as `pipe(...)` gives).
    Without a rewinding edit this is exactly `pipe(prompt, **kwargs)`.
    """
    active = _rewinding(pipe)
    if not active:
        return pipe(prompt, **kwargs)
    if kwargs.get("return_dict") is False:
        raise RewindError("rewind: call generate with return_dict=True (the default)")
    per_prompt = int(kwargs.get("num_images_per_prompt") or 1)
    if prompt is None and kwargs.get("prompt_embeds") is None:
        raise RewindError("rewind: give prompt or prompt_embeds")
    if prompt is not None:
        n_prompts = 1 if isinstance(prompt, str) else len(prompt)
    else:
        n_prompts = int(kwargs["prompt_embeds"].shape[0])
    n = n_prompts * per_prompt
    gens = kwargs.get("generator")
    if kwargs.get("latents") is None:
        if not isinstance(gens, (list, tuple)) or len(gens) != n:
            raise RewindError(f"rewind: redoing a sample needs its own initial noise: pass generator= a list of {n} "
                              "torch.Generator (one per image) or latents=")
        states = [(g.device, g.get_state()) for g in gens]
    out = pipe(prompt, **kwargs)

    # Which samples each rewinding edit missed steps of, per open context (each holds its own verdicts).
    forced: list[list] = []
    redo = torch.zeros(n, dtype=torch.bool)
    for v in active:
        per_edit = []
        for late in v.rewind_rows():
            if late is not None and len(late) != n:
                raise RewindError(f"rewind: the detectors read {len(late)} samples for {n} images")
            per_edit.append(late)
            if late is not None:
                redo |= late
        forced.append(per_edit)
    if not bool(redo.any()):
        return out
    rows = redo.nonzero().flatten().tolist()

    again = {k: v for k, v in kwargs.items() if k != "num_images_per_prompt"}
    sub_prompt = None
    if prompt is not None:
        sub_prompt = [_per_sample(prompt, n_prompts, per_prompt, "prompt")[i] for i in rows]
    if kwargs.get("negative_prompt") is not None:
        again["negative_prompt"] = [_per_sample(kwargs["negative_prompt"], n_prompts, per_prompt,
                                                "negative_prompt")[i] for i in rows]
    for k in _ROW_KWARGS:
        t = kwargs.get(k)
        if isinstance(t, torch.Tensor):
            if t.shape[0] == n:
                again[k] = t[rows]
            elif t.shape[0] == n_prompts:
                again[k] = t.repeat_interleave(per_prompt, 0)[rows]
            else:
                raise RewindError(f"rewind: {k} has {t.shape[0]} rows for {n} images")
    if kwargs.get("latents") is None:
        regen = []
        for i in rows:
            device, state = states[i]
            g = torch.Generator(device)
            g.set_state(state)
            regen.append(g)
        again["generator"] = regen
    try:
        for v, per_edit in zip(active, forced):
            v.forced = [None if f is None else f[rows] for f in per_edit]
        second = pipe(sub_prompt, **again)
    finally:
        for v in active:
            v.forced = [None] * len(v.forced)
    out.images = _put(out.images, rows, second.images)
    return out


__all__ = ["generate", "open_gate", "RewindError", "ACTIVE_GATES"]
