"""Run a pipeline over a prompt set and write the activations at chosen hookpoints to stores.

Resumable: a store knows which prompts it holds; a rerun skips them, and a prompt is committed whole
(every step, every branch) or not at all, so a kill at any moment loses at most the uncommitted
prompts and never duplicates one. Several processes (accelerate launch) take prompts i with
i % world_size == rank, each writing its own shards; rank 0 merges the manifests at the end.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
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
    commit_seconds: float = 60.0           # ... or once this long has passed since the last commit (a kill loses at most that)
    model_id: str = ""
    max_sequence_length: int | None = None  # T5 length for SD3/FLUX (pipeline default when None)
    text_only: bool | None = None          # None: encode prompts only when every hookpoint is a text layer
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        check_config(self)


BRANCHES = ("cond", "uncond")


def _positive_int(value, option: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise StoreError(f"{option} must be a positive {what}, got {value!r}")


def check_config(cfg: CollectConfig) -> None:
    """Every option's value, checked before a model runs or a store is created (one-line StoreError
    naming the CLI option). The keep-steps range is checked by `collect` once it knows the hookpoints."""
    if not cfg.hookpoints:
        raise StoreError("--hookpoint: give at least one hookpoint (see --list-hookpoints)")
    _positive_int(cfg.steps, "--steps", "number of denoising steps")
    if not isinstance(cfg.guidance, (int, float)) or not math.isfinite(cfg.guidance):
        raise StoreError(f"--guidance must be a finite number, got {cfg.guidance!r}")
    branches = tuple(cfg.branches)
    if not branches or any(b not in BRANCHES for b in branches):
        bad = next((b for b in branches if b not in BRANCHES), None)
        raise StoreError(f"--branch must be cond or uncond (repeatable), got {bad!r}")
    if len(set(branches)) != len(branches):
        raise StoreError(f"--branch: each branch once, got {list(branches)}")
    if cfg.keep_steps is not None:
        if not cfg.keep_steps:
            raise StoreError("--keep-steps: no step index given; omit the option to keep every step")
        for t in cfg.keep_steps:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise StoreError(f"--keep-steps: step indices are integers >= 0, got {t!r}")
    if cfg.tokens_per_record is not None:
        _positive_int(cfg.tokens_per_record, "--tokens-per-record", "number of patches (omit it to keep all)")
    _positive_int(cfg.batch_size, "--batch-size", "number of prompts")
    if cfg.dtype not in DTYPES:
        raise StoreError(f"--store-dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    for option, v in (("--height", cfg.height), ("--width", cfg.width)):
        if v is not None:
            _positive_int(v, option, "number of pixels")
            if v % 8:
                raise StoreError(f"{option} must be a multiple of 8, got {v}")
    if not isinstance(cfg.shard_mb, (int, float)) or not math.isfinite(cfg.shard_mb) or cfg.shard_mb < 0:
        raise StoreError(f"--shard-mb must be a size in MB >= 0 (0: a shard per batch), got {cfg.shard_mb!r}")
    if cfg.max_sequence_length is not None:
        _positive_int(cfg.max_sequence_length, "--max-sequence-length", "number of tokens")
    if not isinstance(cfg.commit_seconds, (int, float)) or not cfg.commit_seconds > 0:
        raise StoreError(f"commit_seconds must be a positive number of seconds, got {cfg.commit_seconds!r}")


@contextlib.contextmanager
def writer_lock(out_dir: Path, rank: int):
    """One collect per output folder and process rank: a second one is refused with a clear message
    (two writers would race on the manifest and the part files). An OS lock, released on exit or kill."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / f".collect-rank-{rank:03d}.lock", "a+")
    except OSError as e:
        raise StoreError(f"cannot write in --out {out_dir}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise StoreError(f"another collect is writing to {out_dir} ({who}); wait for it to finish or give "
                             "another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()


def parse_keep_steps(text: str | None) -> list[int] | None:
    """--keep-steps "0,10,49" -> [0, 10, 49]; None -> None (every step)."""
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise StoreError(f"--keep-steps must be comma-separated step indices such as 0,10,49, got {text!r}") from None


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
        kw.update(_call_kwargs(fn, prompt=texts, device=getattr(pipe, "_execution_device", pipe.device), num_images_per_prompt=1,
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
    check_config(cfg)  # (again: the fields may have been changed since construction)
    hps = [resolve_hookpoint(pipe, h) for h in cfg.hookpoints]  # unknown names fail before anything is written
    text_only = cfg.text_only if cfg.text_only is not None else all(h.kind == "text" for h in hps)
    if cfg.keep_steps is not None and not text_only:
        late = [t for t in cfg.keep_steps if t >= cfg.steps]
        if late:
            raise StoreError(f"--keep-steps {late[0]} is past the last step: with --steps {cfg.steps} the indices "
                             f"are 0..{cfg.steps - 1}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StoreError(f"--out {out_dir} is a file; give a folder")
    with writer_lock(out_dir, rank):
        return _collect_locked(pipe, prompts, out_dir, cfg, hps, text_only, rank, world_size, progress, barrier)


def _collect_locked(pipe, prompts, out_dir, cfg, hps, text_only, rank, world_size, progress, barrier):
    stores = {h.name: ActivationStore.create(out_dir / store_dirname(h.name), _header(cfg, h, prompts)) for h in hps}
    if world_size == 1:  # shards listed but missing or damaged: their prompts are collected again
        for s in stores.values():
            s.repair()
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
    t0 = last_commit = time.perf_counter()
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
                if any(w.buffered_bytes >= limit for w in writers.values()) or \
                        time.perf_counter() - last_commit >= cfg.commit_seconds:
                    commit_all()
                    last_commit = time.perf_counter()
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
