"""Tuning for erasure that holds on every prompt: one score over named and implicit prompts of the
tuning split, under a collateral budget.

The generalization benchmark (`generalization.py`) judges an erasure on named prompts, held-out
names, implicit prompts (the attribute left out, the empty prompt) and adversarial prompts, with the
damage to everything else. Tuning a method on named prompts alone picks a keyword filter, so this
module scores every candidate setting on the same axes, computed on the *tuning* split (tuning seeds,
canonical names: `GeneralizationConfig(split="tuning")`), and picks the one that violates the bars
least. The held-out names and the evaluation seeds stay unseen until the benchmark's own run.

The bars are the targets of the project's erasure issue; the score of a concept is the sum over axes
of how far each axis is past its bar, relative to the bar (0 when every bar holds), and a method's
score is the mean over its concepts. Ties (several candidates within every bar) go to the candidate
with the smallest raw damage (paired change + TV + FD ratio), so the gentlest sufficient edit wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .generalization import GeneralizationConfig, implicit_relative, run_generalization

# (axis, bar, "max" = the value must stay below the bar, "min" = above it)
BARS = (("named", 0.05, "max"), ("held_out", 0.05, "max"), ("implicit_rel", 0.2, "max"),
        ("rest_accuracy", 0.95, "min"), ("paired_change", 0.05, "max"), ("tv_other", 0.15, "max"),
        ("fd_ratio", 0.3, "max"), ("adversarial", 0.10, "max"))


# A concept the plain model never drew on the implicit prompts but the edit did makes the ratio infinite;
# the score counts it as this many times the base rate (a few images of a small sample).
IMPLICIT_REL_CAP = 5.0


def axis_value(row: dict, axis: str):
    v = min(implicit_relative(row), IMPLICIT_REL_CAP) if axis == "implicit_rel" else row.get(axis)
    return None if v is None or v != v else float(v)


def violation(row: dict, paired: bool = True) -> float:
    """Sum over axes of (distance past the bar) / bar; 0 when every bar holds. `paired=False` leaves
    the paired-change axis out (Concept Steerers edits the text, so it touches every sample: the issue
    reports its paired figure without a bar)."""
    total = 0.0
    for axis, bar, kind in BARS:
        if axis == "paired_change" and not paired:
            continue
        v = axis_value(row, axis)
        if v is None:
            continue
        if kind == "max":
            total += max(0.0, v - bar) / bar
        else:
            total += max(0.0, bar - v) / (1.0 - bar)
    return total


def damage(row: dict) -> float:
    return sum(axis_value(row, a) or 0.0 for a in ("paired_change", "tv_other", "fd_ratio"))


def method_score(rows: list[dict], paired: bool = True) -> tuple[float, float]:
    """(mean violation, mean damage) over a method's concepts: lower is better, compared in that order."""
    if not rows:
        return float("inf"), float("inf")
    return (sum(violation(r, paired) for r in rows) / len(rows), sum(damage(r) for r in rows) / len(rows))


@dataclass
class TuneResult:
    best: str
    scores: dict = field(default_factory=dict)   # candidate -> (violation, damage)
    rows: dict = field(default_factory=dict)     # candidate -> concept rows (tuning split)
    paired: bool = True

    def table(self) -> list[tuple[str, float, float]]:
        return sorted(((n, *s) for n, s in self.scores.items()), key=lambda x: (x[1], x[2]))

    def best_per_kind(self) -> dict[str, tuple[str, float, float]]:
        """{kind: (candidate, violation, damage)}: presets are per kind, so each kind gets its own winner."""
        out: dict = {}
        for name, rows in self.rows.items():
            for kind in {r["kind"] for r in rows}:
                v, d = method_score([r for r in rows if r["kind"] == kind], self.paired)
                if kind not in out or (v, d) < out[kind][1:]:
                    out[kind] = (name, v, d)
        return out

    def best_per_concept(self) -> dict[tuple[str, str], tuple[str, float, float]]:
        """{(kind, concept): (candidate, violation, damage)}: each concept's own winner (per-concept presets).
        Judged on the tuning split like everything here, so a concept's winner is still tested on unseen seeds."""
        out: dict = {}
        for name, rows in self.rows.items():
            for r in rows:
                key = (r["kind"], r["concept"])
                score = (violation(r, self.paired), damage(r))
                if key not in out or score < out[key][1:]:
                    out[key] = (name, *score)
        return out


def tune(pipe, classifier, candidates: dict, cfg: GeneralizationConfig, paired: bool = True,
         progress=None) -> TuneResult:
    """candidates: {name: {kind: builder}} as for `run_generalization`. Every candidate is judged on
    the tuning split (cfg.split is forced to "tuning"); returns the best by `method_score`."""
    from dataclasses import replace

    tcfg = replace(cfg, split="tuning")
    res = run_generalization(pipe, classifier, candidates, tcfg, progress=progress)
    scores = {n: method_score(r, paired) for n, r in res["rows"].items()}
    best = min(scores, key=lambda n: scores[n])
    return TuneResult(best, scores, res["rows"], paired)


# ---------------------------------------------------------------------------------------------
# candidate settings
# ---------------------------------------------------------------------------------------------
def saeuron_name(p: dict) -> str:
    blocks = "+".join(b.replace("unet.", "").replace(".attentions.", "a").replace("_blocks", "")
                      .replace(".transformer_blocks.0.attn2", ":attn2") for b in p["blocks"])
    win = f" steps {p['window'][0]}-{p['window'][1]}" if p.get("window") else ""
    e = p.get("edit", "scale")
    edit = e if e != "scale" else f"γ={p['multiplier']:g}"   # replace and the patch edits ignore γ
    return (f"SAeUron {blocks} n={p['top_n']} {edit} {p.get('scaling', 'mean')}/"
            f"{p.get('selection', 'paper')} fire≥{p.get('min_fire', 1)}{win}")


def saeuron_candidates(pipe, blocks_by_kind: dict, settings: list[dict], kinds=("style", "object")) -> dict:
    """SAeUron with each setting ({"blocks", "top_n", "multiplier", "scaling", "selection", "min_fire",
    "window", "edit"}) for every concept of the kinds; blocks_by_kind = {kind: {hookpoint: (sae, dictionary)}}."""
    from ..eval.shapes import saeuron_context

    def for_kind(kind, p):
        def build(concept):
            return lambda: saeuron_context(pipe, blocks_by_kind[kind], {concept: p})
        return build

    return {saeuron_name(p): {k: for_kind(k, p) for k in kinds if k in blocks_by_kind} for p in settings}



def family_name(lam: float, imp: float, neg: float | None = None, match: str = "tokens", from_step: int = 0,
                detector: tuple | None = None) -> str:
    branch = "" if neg is None or neg == imp else f"/neg×{neg:g}"
    start = f" from step {from_step}" if from_step else ""
    det = f" where the step-{detector[0]} probe says p≥{detector[1]:g}" if detector else ""
    return f"CS family gate ({match}) λ={lam:g} implicit×{imp:g}{branch}{start}{det}"


def family_candidates(pipe, text_sae, settings: list[tuple], kinds=("style", "object", "colour")) -> dict:
    """Concept Steerers with a FamilyGate at each (λ, implicit fraction[, negative-branch fraction[, match[,
    first step of the implicit fraction[, detector (probe step, threshold) or None]]]]). λ None: each
    concept's shipped λ (`steer_strength` of the shipped params)."""
    from ..eval.shapes import family_removal, steer_strength
    from ..interventions.steer import steer_text_encoder
    from .bundle import load_params

    shipped = load_params()["steer"]

    def for_kind(kind, lam, imp, neg, match, start, det):
        def build(concept):
            strength = steer_strength(shipped, kind, concept) if lam is None else lam
            st = family_removal(text_sae, pipe, kind, concept, strength, imp, neg, match, start, det)
            return lambda: steer_text_encoder(pipe, st)
        return build

    out = {}
    for setting in settings:
        lam, imp, neg, match, start, det = (*setting, *(None, "tokens", 0, None)[len(setting) - 2:])
        name = family_name(lam if lam is not None else float("nan"), imp, neg, match, start, det)
        if lam is None:
            name = name.replace("λ=nan", "λ shipped")
        out[name] = {k: for_kind(k, lam, imp, neg, match, start, det) for k in kinds}
    return out
