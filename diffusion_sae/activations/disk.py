"""Disk needed by a collection, measured before it starts.

The first prompt is collected with the run's exact settings (hookpoints, steps, kept steps, branches,
tokens per record, storage dtype) into a temporary folder beside the output; its size times the
prompts still to collect is the estimate. One prompt of work buys an exact per-prompt figure for
every hookpoint kind and option, instead of a model of what each pipeline stores.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from ..errors import DiffusionSAEError


class DiskSpaceError(DiffusionSAEError, OSError):
    """The collection will not fit on the output's disk (one-line message)."""


def _existing_parent(path: Path) -> Path:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return p


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _done_prompts(out: Path, hookpoints: list[str]) -> int:
    """Prompts already in every hookpoint's store under `out` (a resumed run), else 0."""
    from .collect import store_dirname
    from .store import ActivationStore

    done = []
    for hp in hookpoints:
        d = out / store_dirname(hp)
        if not (d / "manifest.json").is_file():
            return 0
        try:
            done.append(int(ActivationStore(d).counts()["prompts"]))
        except Exception:
            return 0
    return min(done) if done else 0


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def estimate_collect(pipe, prompts, out, cfg) -> dict:
    """{'per_prompt', 'remaining', 'needed', 'free'} in bytes / prompts for collecting `prompts` into `out`."""
    from .collect import collect
    from .prompts import PromptSet

    out = Path(out)
    remaining = len(prompts) - _done_prompts(out, list(cfg.hookpoints))
    base = _existing_parent(out)
    free = shutil.disk_usage(base).free
    if remaining <= 0:
        return {"per_prompt": 0, "remaining": 0, "needed": 0, "free": free}
    probe = tempfile.mkdtemp(prefix=".diffusion-sae-disk-probe-", dir=base)
    try:
        one = PromptSet(rows=[prompts.rows[0]], source=prompts.source)
        collect(pipe, one, probe, replace(cfg, batch_size=1))
        per_prompt = _folder_bytes(Path(probe))
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return {"per_prompt": per_prompt, "remaining": remaining, "needed": per_prompt * remaining, "free": free}


def check_collect_fits(pipe, prompts, out, cfg, margin: float = 0.95) -> dict:
    """The estimate, or DiskSpaceError (one line) when it exceeds `margin` of the free space."""
    est = estimate_collect(pipe, prompts, out, cfg)
    if est["needed"] > margin * est["free"]:
        hint = "lower --tokens-per-record, --keep-steps or the number of prompts"
        if cfg.dtype == "float32":
            hint += ", or store float16 / bfloat16 (--store-dtype)"
        raise DiskSpaceError(f"collect needs about {human(est['needed'])} at {out} ({human(est['per_prompt'])} per prompt "
                             f"x {est['remaining']:,} prompts) but only {human(est['free'])} is free there; {hint}")
    return est
