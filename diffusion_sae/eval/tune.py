"""Hyper-parameter tuning on a small prompt set (seeds disjoint from the benchmark's).

SAeUron (per concept): the official sweep — a grid of (features per step, γ) scored by
(UA + IRA) / 2 — or, beyond it, successive halving on mean(UA, IRA, CRA): every configuration
is scored on a few images, the better half is kept and re-scored on twice as many, until one is left.
Concept Steerers (per kind): a strength sweep; the weakest λ that removes the concepts (presence
≤ 5 %) while keeping the other attributes, else the best trade-off.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..world.evaluate import PromptSet, grid_prompts
from ..world.config import GUIDANCE
from ..world.splits import TUNING_SEEDS, check_tuning
from .shapes import KINDS, ShapesBench, SweepResult, concept_text, removal_row, unlearning_row

TOP_N = (1, 2, 4, 8)
GAMMAS = (-1.0, -5.0, -10.0, -20.0, -30.0)
TUNING_SEED = TUNING_SEEDS.start


def tuning_set(kind: str, concept: str, n: int, seed: int = TUNING_SEED) -> PromptSet:
    """n prompts: half ask for the concept, half don't (all kinds of the other attributes)."""
    full = grid_prompts(max(1, (n + 79) // 80 * 2), seed)
    ci = KINDS[kind].index(concept)
    attr = {"style": full.styles, "object": full.objects, "colour": full.colours}[kind]
    g = torch.Generator().manual_seed(seed + ci)
    asked = [i for i in range(len(attr)) if attr[i] == ci]
    rest = [i for i in range(len(attr)) if attr[i] != ci]
    pick = [asked[i] for i in torch.randperm(len(asked), generator=g)[: n // 2].tolist()] + \
           [rest[i] for i in torch.randperm(len(rest), generator=g)[: n - n // 2].tolist()]
    ps = PromptSet(*[[getattr(full, f)[i] for i in pick] for f in ("prompts", "seeds", "objects", "styles", "colours")])
    check_tuning(ps.seeds, ps.prompts, where=f"tuning set for {concept!r}")
    return ps


@dataclass
class Trial:
    top_n: int
    multiplier: float
    scaling: str = "mean"
    blocks: tuple = ()
    selection: str = "paper"
    min_fire: int = 1
    n_images: int = 0
    UA: float = 0.0
    IRA: float = 0.0
    CRA: float = 0.0

    def score(self, objective: str) -> float:
        if objective == "official":
            return (self.UA + self.IRA) / 2
        return (self.UA + self.IRA + self.CRA) / 3

    def as_dict(self, objective: str) -> dict:
        return {"top_n": self.top_n, "multiplier": self.multiplier, "scaling": self.scaling, "blocks": list(self.blocks),
                "selection": self.selection, "min_fire": self.min_fire,
                "UA": self.UA, "IRA": self.IRA, "CRA": self.CRA,
                "score": self.score(objective), "objective": objective, "images": self.n_images}


def _score_trial(bench: ShapesBench, pipe, blocks: dict, kind, concept, trial: Trial, ps: PromptSet) -> None:
    from ..interventions.ablate import ConceptEdit, unlearn_concepts

    edit = ConceptEdit(concept, trial.multiplier, None, trial.top_n, trial.scaling, trial.selection, trial.min_fire)
    saes = [blocks[b][0] for b in trial.blocks]
    dicts = [blocks[b][1] for b in trial.blocks]
    j = bench.run(ps, lambda: unlearn_concepts(pipe, saes, dicts, [edit]))
    row = unlearning_row(j, kind, concept)
    trial.UA, trial.IRA, trial.CRA, trial.n_images = row["UA"], row["IRA"], row["CRA"], len(ps.prompts)


def tune_saeuron(pipe, classifier, sae, dictionary, kind: str, concepts=None, search: str = "halving",
                 images: int = 64, top_n=TOP_N, gammas=GAMMAS, steps: int = 25, guidance: float = GUIDANCE,
                 progress=None, scalings=("mean",), block_sets=None, selections=("paper",), min_fires=(1,)) -> dict:
    """{concept: best trial as a dict}; `images` is the final (halving) or per-config (grid) set size.

    `sae` / `dictionary` may be lists (one per block); `block_sets` lists the combinations of their
    hookpoints to try (default: all blocks together), e.g. [("unet.up_blocks.1.attentions.1",), (...)].
    """
    if search not in ("grid", "halving"):
        raise ValueError(f"search must be 'grid' or 'halving', not {search!r}")
    from ..interventions.ablate import block_pairs

    blocks = {d.hookpoint: (s, d) for s, d in block_pairs(sae, dictionary)}
    block_sets = [tuple(b) for b in (block_sets or [tuple(blocks)])]
    for bs in block_sets:
        for b in bs:
            if b not in blocks:
                raise ValueError(f"block {b!r} in block_sets has no SAE / dictionary; have {', '.join(blocks)}")
    objective = "official" if search == "grid" else "mean"
    bench = ShapesBench(pipe, classifier, steps, guidance, progress=progress)
    best = {}
    for concept in concepts or KINDS[kind]:
        trials = [Trial(n, g, sc, bs, sel, m) for bs, sel, sc, n, g, m in
                  itertools.product(block_sets, selections, scalings, top_n, gammas, min_fires) if m <= n]
        if search == "grid":
            ps = tuning_set(kind, concept, images)
            for t in trials:
                _score_trial(bench, pipe, blocks, kind, concept, t, ps)
        else:
            rounds = max(1, (len(trials) - 1).bit_length())
            n = max(8, images >> (rounds - 1))
            alive = trials
            while True:
                ps = tuning_set(kind, concept, n)
                for t in alive:
                    _score_trial(bench, pipe, blocks, kind, concept, t, ps)
                if len(alive) == 1:
                    break
                alive = sorted(alive, key=lambda t: t.score(objective), reverse=True)[: max(1, len(alive) // 2)]
                n = min(images, n * 2)
        winner = max(trials if search == "grid" else alive, key=lambda t: t.score(objective))
        best[concept] = winner.as_dict(objective)
    return best


def sweep_steering(pipe, classifier, text_sae, hookpoint: str, kind: str, strengths, n: int = 24,
                   steps: int = 25, guidance: float = GUIDANCE, progress=None, baseline: str | None = None,
                   gate: bool = False, orthogonal: bool = False, contrast: bool = False) -> SweepResult:
    """Concept Steerers removal at each strength for every concept of a kind (tuning prompts); orthogonal:
    each steering keeps the other kinds' concepts (see `concept_steering`'s `keep`); contrast: built from
    matched example prompts (see `steering_unit`)."""
    from ..interventions.steer import steer_text_encoder
    from .shapes import steering_unit

    bench = ShapesBench(pipe, classifier, steps, guidance, progress=progress)
    res = SweepResult(list(strengths))
    sets = {c: tuning_set(kind, c, n) for c in KINDS[kind]}
    bases = {c: bench.run(ps) for c, ps in sets.items()}
    units = {c: steering_unit(text_sae, pipe, kind, c, 1.0, baseline=baseline, gate=gate, orthogonal=orthogonal,
                              contrast=contrast, hookpoint=hookpoint) for c in KINDS[kind]}
    for lam in res.strengths:
        res.rows[lam] = []
        for c, ps in sets.items():
            st = units[c].scaled(lam)
            j = bench.run(ps, lambda st=st: steer_text_encoder(pipe, st))
            res.rows[lam].append(removal_row(j, kind, c, bases[c]))
    return res


def sweep_adding(pipe, classifier, text_sae, hookpoint: str, strengths, seeds: int = 1, steps: int = 25,
                 guidance: float = GUIDANCE, progress=None, baseline: str | None = None) -> dict[float, dict]:
    """Concept Steerers addition: for each λ > 0, the share of style-free prompts that get each style."""
    from ..interventions.steer import concept_steering, steer_text_encoder
    from ..world.config import STYLES
    from .shapes import prompts_without_style

    bench = ShapesBench(pipe, classifier, steps, guidance, progress=progress)
    ps = prompts_without_style(seeds, base_seed=TUNING_SEED)
    everything = torch.ones(len(ps.prompts), dtype=torch.bool)
    units = {s: concept_steering(text_sae, pipe, hookpoint, concept_text("style", s), 1.0, baseline=baseline)
             for s in STYLES}
    out = {}
    for lam in strengths:
        found, kept = [], []
        for si, s in enumerate(STYLES):
            st = units[s].scaled(lam)
            j = bench.run(ps, lambda st=st: steer_text_encoder(pipe, st))
            found.append(j.presence("style", si, everything))
            kept.append(min(j.accuracy("object"), j.accuracy("colour")))
        out[lam] = {"found": sum(found) / len(found), "kept": sum(kept) / len(kept)}
    return out
