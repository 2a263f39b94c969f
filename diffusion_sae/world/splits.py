"""Tuning and evaluation splits of the ShapesCanvas benchmark, enforced in code.

An erasure tuned and judged on the same seeds or the same words measures how well the tuning fit
those images, not how well the concept is gone. So:

- tuning (strength sweeps, SAeUron's searches, presets) and everything an intervention is built
  from (steering matrices, concept dictionaries) use only the canonical concept names and seeds in
  `TUNING_SEEDS`;
- evaluation uses seeds outside that range and may use the held-out names (`config.ALIASES`).

`check_tuning` raises `SplitError` when a tuning call receives an evaluation seed or a held-out
name; `check_evaluation` raises when an evaluation set reuses a tuning seed.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import DiffusionSAEError
from .config import ALIASES

TUNING_SEEDS = range(500, 1000)
# The generalization benchmark's own seeds: never used by tuning, nor by the older named-prompt
# tables (grid seeds 0.., extra seeds 1000, 2000, ...), so its images are fresh.
GENERALIZATION_SEED = 100_000

HELD_OUT_NAMES: frozenset[str] = frozenset(a for aliases in ALIASES.values() for a in aliases)
_WORD = re.compile(r"[a-z]+")


class SplitError(DiffusionSAEError, ValueError):
    """A tuning step saw evaluation data (or the reverse)."""


def held_out_names_in(prompt: str) -> list[str]:
    """The held-out concept names a prompt contains, as whole words."""
    return [w for w in _WORD.findall(prompt.lower()) if w in HELD_OUT_NAMES]


def check_tuning(seeds: Iterable[int] = (), prompts: Iterable[str] = (), where: str = "tuning") -> None:
    """Raise SplitError if any seed lies outside TUNING_SEEDS or any prompt uses a held-out name."""
    bad = sorted({int(s) for s in seeds if int(s) not in TUNING_SEEDS})
    if bad:
        raise SplitError(f"{where}: seed {bad[0]} is not a tuning seed (tuning uses {TUNING_SEEDS.start}-"
                         f"{TUNING_SEEDS.stop - 1}; other seeds are kept for evaluation)")
    for p in prompts:
        names = held_out_names_in(p)
        if names:
            raise SplitError(f"{where}: prompt {p!r} uses the held-out name {names[0]!r}; tuning and the "
                             "building of steering matrices and dictionaries use canonical names only")


def check_evaluation(seeds: Iterable[int], where: str = "evaluation") -> None:
    """Raise SplitError if an evaluation set reuses a tuning seed."""
    bad = sorted({int(s) for s in seeds if int(s) in TUNING_SEEDS})
    if bad:
        raise SplitError(f"{where}: seed {bad[0]} belongs to the tuning split ({TUNING_SEEDS.start}-"
                         f"{TUNING_SEEDS.stop - 1}); evaluate on other seeds")
