"""Concept Steerers on prompts that name no concept of the kind: the implicit fraction on the samples an
image-side concept probe flags.

The shipped FamilyGate used to add a fraction of the removal S to every prompt naming none of the concept's
family, from a late step on: every such sample moved, and removal stayed partial. Here the fraction acts
from step k only on the samples whose concept probe (the kind's shipped probe at step k-1, read on the
unconditional branch; `concepts/probe.py`) gives the concept a probability of at least the threshold, so a
seed that was not heading to the concept is generated as the plain model draws it. Scored like
`tune --method robust-steer` on the tuning split (seeds 500-999, canonical names, the first 3 concepts of
each kind), per kind: mean violation of the erasure bars, implicit presence / base rate, paired change,
FD ratio. The best row of each kind is the shipped preset (params keys family, family_from_step,
family_detector).

Round 3 keeps the shipped preset of each kind (λ, fraction, step, image-side probe, named_late) and adds a
probe of the prompt's branch at step 0 (p >= 0.5 or 0.8; any of the two probes flags): a prompt that asks for
the concept in words the token matcher does not know is flagged before the image has decided.

Rounds 5-7 keep the shipped preset of each kind and add the rewind (params key family_rewind, FamilyGate.rewind):
every sample the probe flags is denoised again from its first latent with the implicit fraction from the first step
(generation goes through interventions.rewind.generate), against the preset, whose flagged samples get it from the
gate's step on only; rounds 6 (objects, colours) and 7 (styles) start the redo at later steps too and print every
concept's figures, from which each concept's pick ships (params "family_rewind": {kind: {concept: step}}).
Round 8 lowers the styles' and objects' probe threshold, with and without a larger implicit fraction.
Round 9 reads the probe late (step 15 or 19) and redoes every flagged sample from step 0.
Round 10 adds the per-position ablation of the concept's N text-SAE features (params "ablate") to the shipped preset,
on every prompt; round 11 on the prompts naming the concept only (the family gate's target rows).
Round 12 varies single concepts' entries (probe step, threshold, implicit fraction, rewind) on more images.

    python benchmarks/detector_gate.py [--concepts-per-kind 3] [--round 1|2|...|12] [--kinds style,object,colour]
                                       [--implicit 16] [--empty 16]        (--concepts-per-kind 0: every concept)
                                       [--concepts diamond,outlined]       (just these)
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_sae.world import assets, bundle, robust_tune  # noqa: E402
from diffusion_sae.world.generalization import GeneralizationConfig  # noqa: E402

# (implicit fraction, first step, (probe step, threshold) or None); λ is each concept's shipped one
ROUNDS = {
    1: ((0.2, 8, None),
        (1.0, 6, (5, 0.1)), (1.0, 6, (5, 0.2)), (1.0, 6, (5, 0.3)),
        (1.0, 8, (7, 0.1)), (1.0, 8, (7, 0.2)), (1.0, 8, (7, 0.3)),
        (1.0, 10, (9, 0.2)), (1.0, 10, (9, 0.3)), (2.0, 8, (7, 0.2))),
    # around round 1's best of each kind (style: 1 from 8, p >= 0.1; object: 1 from 10, p >= 0.2;
    # colour: 2 from 8, p >= 0.2)
    2: ((1.0, 10, (9, 0.1)), (2.0, 10, (9, 0.2)), (1.0, 12, (11, 0.2)), (2.0, 12, (11, 0.2)),
        (3.0, 8, (7, 0.2)), (4.0, 6, (5, 0.2))),
    # the shipped preset, and it OR the prompt's-branch probe at step 0 at these thresholds
    3: (None, 0.5, 0.8),
    # the styles' shipped setting (1 from 12, probe 11) against earlier probes, judged on every style with
    # --implicit 64 --empty 64: the evaluation split's empty prompt kept outlined, gradient and noisy at their
    # base rate, and 16 + 16 implicit images (2-4 of a concept's) cannot rank settings on that axis
    4: ((1.0, 12, (11, 0.2)), (1.0, 10, (9, 0.2)), (1.0, 8, (7, 0.2)), (2.0, 12, (11, 0.2)), (1.0, 8, (7, 0.1))),
    # the shipped preset without and with the rewind (from step 0)
    5: (None, 0),
    # the rewind's redo from a later step, {kind: step} (objects and colours: round 5 moved styles' implicit
    # ratio by nothing)
    6: (None, {"object": 0, "colour": 0}, {"object": 4, "colour": 2}, {"object": 8, "colour": 4}),
    # the same for the styles, per concept (round 5 judged them only as a kind)
    7: (None, {"style": 0}, {"style": 6}, {"style": 10}),
    # round 8 (styles, objects): the evaluation's empty prompt keeps circle, diamond, checkered and star at a third to
    # a half of their base rate: the step-11 probe at a lower threshold (more of them flagged), and with it a larger
    # implicit fraction; (threshold, fraction) per kind, None: the shipped preset
    8: (None, (0.1, None), (0.1, 3.0), (0.2, 3.0)),
    # round 9 (styles, objects): read the probe late, where it knows where a sample is heading, and redo every flagged
    # sample from step 0 (the rewind makes the late verdict cost nothing in how early the fraction acts);
    # (probe step, threshold) per kind for every concept (per-concept thresholds, fractions and rewinds dropped),
    # None: the shipped preset. The step-15 and step-19 probes are fitted like the shipped ones (bundle.fit_probes).
    9: (None, (15, 0.2), (19, 0.2), (19, 0.4)),
    # round 10 (styles, objects): the shipped preset with each concept's N text-SAE features taken out at every
    # position of every prompt (params "ablate", interventions.steer.FeatureAblation), whole (quantile None) or
    # only above the rivals' quantile q (params "ablate_ceiling"); (N, q) per kind, None: the shipped preset
    # (every prompt: "ablate_everywhere"; round 11 keeps it to the prompts naming the concept)
    10: (None, (16, None), (16, 0.9), (16, 0.5)),
    11: (None, 16),
    # round 12 (diamond, outlined): the two implicit misses beyond noise in the acceptance run (diamond 0.47, outlined
    # 0.41 of their base rates) passed on 64 + 64 tuning images (0.15, 0.23); judged again on more images with settings
    # around their presets, per concept {concept: {"step", "threshold", "implicit", "rewind"}} (None: the shipped one)
    12: (None,
         {"diamond": {"rewind": 8}, "outlined": {"implicit": 3.0}},
         {"diamond": {"step": 19, "threshold": 0.6, "rewind": 0}, "outlined": {"threshold": 0.3}},
         {"diamond": {"step": 15, "threshold": 0.4, "implicit": 3.0, "rewind": 4}, "outlined": {"step": 15}},
         {"diamond": {"implicit": 4.0, "rewind": 8}, "outlined": {"threshold": 0.5, "implicit": 3.0}}),
}


def shipped_variants(pipe, text_sae, variants: dict) -> dict:
    """{name: {kind: builder}}: the shipped Concept Steerers preset with each variant's change applied to a copy
    of its params (variants: {name: function(params) -> None})."""
    import copy

    from diffusion_sae.eval.shapes import removal_steering, steer_strength
    from diffusion_sae.interventions.steer import steer_text_encoder

    shipped = bundle.load_params()["steer"]
    out = {}
    for name, change in variants.items():
        cs = copy.deepcopy(shipped)
        change(cs)

        def for_kind(kind, cs=cs):
            def build(concept):
                st = removal_steering(text_sae, pipe, kind, concept, steer_strength(cs, kind, concept), cs)
                return lambda: steer_text_encoder(pipe, st)
            return build
        out[name] = {k: for_kind(k) for k in bundle.KINDS}
    return out


def with_prompt_probe(tau):
    """Round 3's change: the kind's prompt's-branch probe at step 0 (p >= tau) added to its detector."""
    def change(cs):
        if tau is not None:
            for kind, det in cs["family_detector"].items():
                cs["family_detector"][kind] = [det, {"step": 0, "threshold": tau, "branch": "cond"}]
    return change


def with_rewind(steps):
    """Rounds 5-6: the rewind off (None), from one step for every kind with a detector (int), or {kind: step}."""
    def change(cs):
        kinds = cs.get("family_detector", {})
        cs["family_rewind"] = ({} if steps is None else {k: steps for k in kinds} if isinstance(steps, int)
                               else {k: v for k, v in steps.items() if k in kinds})
    return change


def with_gate(threshold, fraction):
    """Round 8's change: every detector of the styles and objects at this threshold; their implicit fraction
    (params "family") at this value (None: the shipped one)."""
    def change(cs):
        for kind in ("style", "object"):
            det = cs["family_detector"][kind]
            for d in det if isinstance(det, list) else [det]:
                d["threshold"] = threshold
            if fraction is not None:
                cs["family"][kind] = fraction
    return change


def with_late_rewind(step, threshold):
    """Round 9's change: the styles' and objects' probe at this step and threshold, the implicit fraction from the
    next step, and every flagged sample redone from step 0; the per-concept overrides of those kinds dropped."""
    def change(cs):
        for kind in ("style", "object"):
            cs["family_detector"][kind] = {"step": step, "threshold": threshold}
            cs["family_from_step"][kind] = step + 1
            cs["family_rewind"][kind] = 0
            cs.get("family_concepts", {}).pop(kind, None)
    return change


def with_ablation(n, q=None, everywhere=True):
    """Round 10's change: the styles' and objects' n-feature ablation (params "ablate") on every prompt, capped at
    the rivals' q-quantile (params "ablate_ceiling"; None: whole); round 11's on the prompts naming the concept."""
    def change(cs):
        cs["ablate"] = {"style": n, "object": n}
        if q is not None:
            cs["ablate_ceiling"] = {"style": q, "object": q}
        if everywhere:
            cs["ablate_everywhere"] = ["style", "object"]
    return change


def with_concept_presets(presets):
    """Round 12's change: each named concept's own entry of params "family_concepts" updated with these keys (step,
    threshold, implicit), and "rewind" as its own entry of params "family_rewind" (None: the shipped one)."""
    def change(cs):
        for concept, keys in (presets or {}).items():
            kind = next(k for k in bundle.KINDS if concept in bundle.KINDS[k])
            keys = dict(keys)
            if "rewind" in keys:
                rewind = cs.setdefault("family_rewind", {}).setdefault(kind, {})
                if not isinstance(rewind, dict):   # a kind-wide step: every other concept keeps it
                    rewind = cs["family_rewind"][kind] = {c: rewind for c in bundle.KINDS[kind]}
                rewind[concept] = keys.pop("rewind")
            cs.setdefault("family_concepts", {}).setdefault(kind, {}).setdefault(concept, {}).update(keys)
    return change


def preset_name(presets) -> str:
    if not presets:
        return "CS shipped"
    return "; ".join(f"{c}: " + ", ".join(f"{k} {v:g}" for k, v in keys.items()) for c, keys in presets.items())


def rewind_name(steps) -> str:
    if steps is None:
        return "CS shipped (no rewind)"
    if isinstance(steps, int):
        return f"CS shipped + rewind from step {steps}"
    return "CS shipped + rewind from step " + ", ".join(f"{v} ({k})" for k, v in steps.items())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts-per-kind", type=int, default=3)
    ap.add_argument("--round", type=int, default=1, choices=sorted(ROUNDS))
    ap.add_argument("--kinds", default="style,object,colour", help="comma-separated kinds")
    ap.add_argument("--implicit", type=int, default=16, help="images per kind on attribute-left-out prompts")
    ap.add_argument("--empty", type=int, default=16, help="images of the empty prompt")
    ap.add_argument("--concepts", default=None, help="comma-separated concepts: just these (overrides "
                    "--concepts-per-kind and --kinds)")
    a = ap.parse_args()
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    text_sae = bundle.load_text_sae()
    if a.round == 3:
        cands = shipped_variants(pipe, text_sae, {
            "CS shipped" if tau is None else f"CS shipped + prompt probe 0 p≥{tau:g}": with_prompt_probe(tau)
            for tau in ROUNDS[3]})
    elif a.round == 8:
        cands = shipped_variants(pipe, text_sae, {
            "CS shipped" if v is None else f"CS shipped, probe p≥{v[0]:g}" + (f", fraction {v[1]:g}" if v[1] else ""):
            (lambda cs: None) if v is None else with_gate(*v) for v in ROUNDS[8]})
    elif a.round == 9:
        cands = shipped_variants(pipe, text_sae, {
            "CS shipped" if v is None else f"CS probe {v[0]} p≥{v[1]:g}, redo from 0":
            (lambda cs: None) if v is None else with_late_rewind(*v) for v in ROUNDS[9]})
    elif a.round == 10:
        cands = shipped_variants(pipe, text_sae, {
            "CS shipped" if v is None else f"CS shipped + ablate {v[0]} features" + (f" above q{v[1]:g}" if v[1] else ""):
            (lambda cs: None) if v is None else with_ablation(*v) for v in ROUNDS[10]})
    elif a.round == 11:
        cands = shipped_variants(pipe, text_sae, {
            "CS shipped" if n is None else f"CS shipped + ablate {n} features where named": (lambda cs: None)
            if n is None else with_ablation(n, everywhere=False) for n in ROUNDS[11]})
    elif a.round == 12:
        cands = shipped_variants(pipe, text_sae, {preset_name(v): with_concept_presets(v) for v in ROUNDS[12]})
    elif a.round in (5, 6, 7):
        cands = shipped_variants(pipe, text_sae, {rewind_name(v): with_rewind(v) for v in ROUNDS[a.round]})
    else:
        settings = [(None, f, None, "embedding", k, det) for f, k, det in ROUNDS[a.round]]
        cands = robust_tune.family_candidates(pipe, text_sae, settings)
    kinds = tuple(a.kinds.split(","))
    only = None
    if a.concepts:
        names = a.concepts.split(",")
        unknown = [c for c in names if not any(c in cs for cs in bundle.KINDS.values())]
        if unknown:
            ap.error(f"--concepts: unknown concept(s) {unknown}; choose from {sorted(sum(bundle.KINDS.values(), ()))}")
        only = {k: tuple(c for c in names if c in cs) for k, cs in bundle.KINDS.items()}
        only = {k: v for k, v in only.items() if v}
        kinds = tuple(only)
    t0 = time.perf_counter()
    cfg = GeneralizationConfig(concepts_per_kind=a.concepts_per_kind or None, kinds=kinds, implicit=a.implicit,
                               empty=a.empty, only=only)
    res = robust_tune.tune(pipe, clf, cands, cfg, paired=False)
    scope = a.concepts if a.concepts else f"{a.concepts_per_kind} concepts per kind"
    print(f"tuning split, {scope}, {time.perf_counter() - t0:.0f} s")
    print("| kind | setting | mean violation | implicit / base (worst) | paired change (worst) | FD ratio (worst) | rest accuracy (worst) |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        best = None
        for name in res.rows:
            rows = [r for r in res.rows[name] if r["kind"] == kind]
            v = sum(robust_tune.violation(r, paired=False) for r in rows) / len(rows)
            worst = lambda key, f=max: f(robust_tune.axis_value(r, key) or 0.0 for r in rows)  # noqa: E731
            print(f"| {kind} | {name} | {v:.2f} | {worst('implicit_rel'):.2f} | {100 * worst('paired_change'):.0f} % | "
                  f"{worst('fd_ratio'):.2f} | {100 * worst('rest_accuracy', min):.0f} % |", flush=True)
            best = (v, name) if best is None or v < best[0] else best
        print(f"| {kind} | **best: {best[1]}** | {best[0]:.2f} | | | | |")
    print("\nper concept: violation / implicit ratio / paired change / FD ratio")
    print("| concept | " + " | ".join(res.rows) + " |")
    print("|---|" + "---|" * len(res.rows))
    first = next(iter(res.rows.values()))
    for i, r0 in enumerate(first):
        cells = []
        for name in res.rows:
            r = res.rows[name][i]
            ax = lambda key: robust_tune.axis_value(r, key) or 0.0  # noqa: E731
            cells.append(f"{robust_tune.violation(r, paired=False):.2f} / {ax('implicit_rel'):.2f} / "
                         f"{100 * ax('paired_change'):.0f} % / {ax('fd_ratio'):.2f}")
        print(f"| {r0['kind']}: {r0.get('concept', i)} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
