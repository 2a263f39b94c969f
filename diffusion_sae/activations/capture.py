"""Record activations at named hookpoints during an ordinary `pipe(...)` call.

    with capture_activations(pipe, ["unet.up_blocks.1.attentions.1"], branches=("cond",)) as cap:
        pipe(prompts, num_inference_steps=50)
    cap.records  # list[CaptureBatch]: one per (module call, branch), tokens x d

Each module call yields one CaptureBatch per guidance branch, labelled from the pipeline's batching
(StepTracker), with the step index and timestep read from the timestep the denoiser received.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..models.hookpoints import Hookpoint, as_tokens, read_tensor, resolve_hookpoint
from ..models.step_tracker import StepTracker

BRANCHES = ("cond", "uncond", "cond_skip", "unknown")


@dataclass
class CaptureBatch:
    """Activations of one branch of one module call: `activations[i]` is one image's (or prompt's) tokens."""
    hookpoint: str
    activations: torch.Tensor   # [n, tokens, d]; 4-D maps flattened row-major over (h, w)
    prompt_index: torch.Tensor  # [n] int64: index of the prompt (prompt_ids mapping applied)
    image_index: torch.Tensor   # [n] int64: which of num_images_per_prompt images
    step_index: int             # position in scheduler.timesteps; -1 for text-encoder calls
    timestep: float             # scheduler timestep value; nan for text-encoder calls
    branch: str                 # "cond" | "uncond" | "cond_skip" | "unknown"
    grid: tuple[int, int] | None  # (H, W) of a 4-D map, None for token sequences


class Capture:
    """Hooks that record activations; install with `with`, removed on exit even if the call raises."""

    def __init__(self, pipe, hookpoints: Iterable[str | Hookpoint], branches: Iterable[str] = ("cond", "uncond"),
                 steps: Iterable[int] | None = None, to=None, prompt_ids: list[int] | None = None,
                 dtype: torch.dtype | None = None):
        self.pipe = pipe
        self.hookpoints = [h if isinstance(h, Hookpoint) else resolve_hookpoint(pipe, h) for h in hookpoints]
        bad = [b for b in branches if b not in BRANCHES]
        if bad:
            raise ValueError(f"unknown branch {bad[0]!r}; choose from {', '.join(BRANCHES)}")
        self.branches = tuple(branches)
        self.steps = None if steps is None else set(int(s) for s in steps)
        self.prompt_ids = prompt_ids
        self.dtype = dtype
        self.records: list[CaptureBatch] = []
        self._emit: Callable[[CaptureBatch], None] = (
            self.records.append if to is None else (to.add if hasattr(to, "add") else to))
        self.tracker = StepTracker(pipe)
        self._handles: list = []

    def __enter__(self):
        self.tracker.__enter__()
        try:
            for hp in self.hookpoints:
                self._handles.append(hp.module.register_forward_hook(self._hook(hp), with_kwargs=True))
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.tracker.close()

    def _hook(self, hp: Hookpoint):
        def hook(module, args, kwargs, output):
            tr = self.tracker
            if hp.kind == "denoiser" and self.steps is not None and tr.step_index not in self.steps:
                return None
            with torch.no_grad():
                x = read_tensor(hp, module, args, kwargs, output)
                tokens, grid = as_tokens(x.detach(), hp.name)
                b = tokens.shape[0]
                if hp.kind == "text":
                    groups, step, t = {tr.text_branch(hp.component): slice(0, b)}, -1, math.nan
                else:
                    groups = tr.branches(b)
                    step = -1 if tr.step_index is None else tr.step_index
                    t = tr.timestep
                for branch, rows in groups.items():
                    if branch not in self.branches:
                        continue
                    acts = tokens[rows]
                    n = acts.shape[0]
                    # Text encoders see each prompt once; the denoiser sees num_images_per_prompt copies.
                    per = tr.images_per_prompt(n) if hp.kind == "denoiser" else 1
                    idx = torch.arange(n)
                    prompt = idx // per
                    if self.prompt_ids is not None:
                        prompt = torch.as_tensor(self.prompt_ids, dtype=torch.int64)[prompt]
                    acts = acts.to(dtype=self.dtype or acts.dtype, device="cpu", copy=True)
                    self._emit(CaptureBatch(hookpoint=hp.name, activations=acts, prompt_index=prompt,
                                            image_index=idx % per, step_index=step, timestep=t, branch=branch,
                                            grid=grid))
            return None
        return hook


@contextmanager
def capture_activations(pipe, hookpoints, branches=("cond", "uncond"), steps=None, to=None, prompt_ids=None,
                        dtype=None):
    """Context manager form of Capture; yields it (`cap.records` holds batches when `to` is None).

    `to`: None (keep in memory), a callable taking a CaptureBatch, or an object with `.add(batch)`.
    `steps`: denoising step indices to keep (None = all). `prompt_ids`: prompt number of each prompt of
    the call (default 0..n-1).
    """
    cap = Capture(pipe, hookpoints, branches=branches, steps=steps, to=to, prompt_ids=prompt_ids, dtype=dtype)
    with cap:
        yield cap
