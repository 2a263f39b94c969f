"""Run a pipeline over a prompt set and write the activations at chosen hookpoints to stores.

Resumable: a store knows which prompts it holds; a rerun skips them, and a prompt is committed whole
(every step, every branch) or not at all, so a kill at any moment loses at most the uncommitted
prompts and never duplicates one. Several processes (accelerate launch) take prompts i with
i % world_size == rank, each writing its own shards; rank 0 merges the manifests at the end.
"""
from __future__ import annotations

import inspect
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..models.hookpoints import resolve_hookpoint
from .capture import Capture
from .prompts import PromptSet
from .store import DTYPES, ActivationStore, StoreError


@dataclass
class CollectConfig:
    hookpoints: list[str]
    steps: int = 50
    guidance: float = 7.5                  # rows with their own evaluation_guidance override it
    branches: tuple[str, ...] = ("cond",)
    keep_steps: list[int] | None = None    # denoising step indices to store (None = all)
    tokens_per_record: int | None = None   # random subset of patches per record (None = all)
    batch_size: int = 1                    # prompts per pipeline call
    dtype: str = "float16"                 # storage dtype
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    shard_mb: float = 128.0                # commit a shard once this much is buffered
    model_id: str = ""
    max_sequence_length: int | None = None  # T5 length for SD3/FLUX (pipeline default when None)
    text_only: bool | None = None          # None: encode prompts only when every hookpoint is a text layer
    extra: dict = field(default_factory=dict)


def store_dirname(hookpoint: str) -> str:
    """Folder name of a hookpoint's store ("unet.up_blocks.1.attentions.1:update" -> "...__update")."""
    return re.sub(r"[^A-Za-z0-9._-]", "__", hookpoint)


def _header(cfg: CollectConfig, hp, prompts: PromptSet) -> dict:
    return {"model": cfg.model_id, "hookpoint": hp.name, "component": hp.component, "kind": hp.kind,
            "read": hp.read, "width": hp.width, "dtype": cfg.dtype, "prompts_hash": prompts.hash(),
            "num_prompts": len(prompts), "prompts_source": prompts.source,
            "steps": None if hp.kind == "text" else cfg.steps, "guidance": cfg.guidance,
            "branches": list(cfg.branches), "keep_steps": cfg.keep_steps, "tokens_per_record": cfg.tokens_per_record,
            "image_height": cfg.height, "image_width": cfg.width, "negative_prompt": cfg.negative_prompt}


def _call_kwargs(fn, **kw) -> dict:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params and v is not None}


def _batches(todo: list[int], prompts: PromptSet, cfg: CollectConfig) -> list[list[int]]:
    """Consecutive prompts with the same guidance, at most batch_size per call."""
    out: list[list[int]] = []
    for i in todo:
        g = prompts.rows[i].guidance
        if out and len(out[-1]) < cfg.batch_size and prompts.rows[out[-1][0]].guidance == g:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _run(pipe, ids: list[int], prompts: PromptSet, cfg: CollectConfig, text_only: bool) -> None:
    texts = [prompts.rows[i].prompt for i in ids]
    neg = [cfg.negative_prompt] * len(ids) if cfg.negative_prompt is not None else None
    guidance = prompts.rows[ids[0]].guidance
    guidance = cfg.guidance if guidance is None else guidance
    if text_only:
        # The text encoders run once per prompt and ignore seed and step; no denoising needed (spec §2.3).
        fn = type(pipe).encode_prompt  # the class's signature (the instance's may be a capture wrapper)
        params = inspect.signature(fn).parameters
        kw = {k: None for k, p in params.items() if p.default is inspect.Parameter.empty and k != "self"
              and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
        kw.update(_call_kwargs(fn, prompt=texts, device=pipe.device, num_images_per_prompt=1,
                               do_classifier_free_guidance="uncond" in cfg.branches, negative_prompt=neg,
                               max_sequence_length=cfg.max_sequence_length))
        with torch.no_grad():
            pipe.encode_prompt(**kw)
        return
    gens = [torch.Generator().manual_seed(prompts.rows[i].seed) for i in ids]
    kw = _call_kwargs(pipe.__call__, prompt=texts, negative_prompt=neg, num_inference_steps=cfg.steps,
                      guidance_scale=guidance, generator=gens, height=cfg.height, width=cfg.width,
                      output_type="latent", max_sequence_length=cfg.max_sequence_length)
    with torch.no_grad():
        pipe(**kw)


def collect(pipe, prompts: PromptSet, out_dir: str | Path, cfg: CollectConfig, rank: int = 0, world_size: int = 1,
            progress: Callable[[int, int, str], None] | None = None,
            barrier: Callable[[], None] | None = None) -> dict[str, ActivationStore]:
    """Collect activations of `prompts` at `cfg.hookpoints` into `out_dir/<hookpoint>/` stores.

    Returns {hookpoint name: store}. Raises HookpointError / StoreError with one-line messages; the
    stores stay readable (and resumable) whatever happens.
    """
    if cfg.dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    hps = [resolve_hookpoint(pipe, h) for h in cfg.hookpoints]  # unknown names fail before anything is written
    text_only = cfg.text_only if cfg.text_only is not None else all(h.kind == "text" for h in hps)
    out_dir = Path(out_dir)
    stores = {h.name: ActivationStore.create(out_dir / store_dirname(h.name), _header(cfg, h, prompts)) for h in hps}
    writers = {n: s.writer(rank, tokens_per_record=cfg.tokens_per_record) for n, s in stores.items()}
    done = {n: s.done_prompts() for n, s in stores.items()}
    mine = [i for i in range(len(prompts)) if i % world_size == rank]
    todo = [i for i in mine if any(i not in d for d in done.values())]
    limit = cfg.shard_mb * 2 ** 20
    n_done = len(mine) - len(todo)
    if progress:
        progress(n_done, len(mine), "resumed" if n_done else "")

    pending: dict[str, list] = {n: [] for n in stores}

    def route(batch):
        # Prompts a store already holds (from an interrupted multi-hookpoint run) are not written twice.
        if all(int(p) not in done[batch.hookpoint] for p in batch.prompt_index):
            pending[batch.hookpoint].append(batch)

    def commit_all():
        for w in writers.values():
            w.commit()

    cap = Capture(pipe, hps, branches=cfg.branches, steps=cfg.keep_steps, to=route, dtype=DTYPES[cfg.dtype])
    t0 = time.perf_counter()
    try:
        with cap:
            for k, ids in enumerate(_batches(todo, prompts, cfg)):
                cap.prompt_ids = ids
                for v in pending.values():
                    v.clear()
                _run(pipe, ids, prompts, cfg, text_only)
                for name, w in writers.items():  # the call finished: its records are complete
                    for b in pending[name]:
                        w.add(b)
                    w.mark_done([i for i in ids if i not in done[name]])
                if any(w.buffered_bytes >= limit for w in writers.values()):
                    commit_all()
                n_done += len(ids)
                if progress:
                    rate = (n_done - (len(mine) - len(todo))) / max(time.perf_counter() - t0, 1e-9)
                    progress(n_done, len(mine), f"{rate:.2f} prompts/s")
        commit_all()
    except StoreError:
        raise
    except BaseException:
        # Keep the prompts finished before the failure (e.g. Ctrl-C, a bad hookpoint tensor).
        try:
            for w in writers.values():
                w.commit()
        except StoreError:
            pass
        raise
    if barrier is not None:
        barrier()
    if rank == 0:
        for s in stores.values():
            s.merge_parts()
    return {n: ActivationStore(s.dir) for n, s in stores.items()}


def config_dict(cfg: CollectConfig) -> dict:
    return asdict(cfg)
