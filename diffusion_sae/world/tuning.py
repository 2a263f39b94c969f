"""What `diffusion-sae tune` decides: how each method's sweep winners go into the shipped-params table
(params.json layout, world/bundle.py), and which variant a sweep runs when an option is left out.

Each `tune_*` function runs one sweep on the tuning split (eval/tune.py), writes the winners into
`params` in place and returns the lines to print; the CLI only checks options, loads and prints.
"""
from __future__ import annotations

from typing import Callable, Optional

from ..errors import DiffusionSAEError

Advance = Optional[Callable[[int], None]]


class TuneOptionError(DiffusionSAEError, ValueError):
    """Tuning options that contradict each other (named in one line)."""


def tune_saeuron_params(pipe, clf, params: dict, kind: str, *, concepts, search: str, images: int, top_n: list[int],
                        gammas: list[float], scalings: list[str], selections: list[str], min_fires: list[int],
                        block_sets: list[tuple[str, ...]], progress: Advance = None) -> list[str]:
    """Per-concept SAeUron settings (top-n, γ, scaling, selection, evidence gate, blocks) into params["saeuron"]."""
    from ..eval.tune import tune_saeuron
    from . import bundle

    names = sorted({b for bs in block_sets for b in bs})
    got = bundle.load_blocks(kind, names)
    best = tune_saeuron(pipe, clf, [got[b][0] for b in names], [got[b][1] for b in names], kind,
                        concepts=concepts or None, search=search, images=images, progress=progress,
                        top_n=top_n, gammas=gammas, scalings=scalings, block_sets=block_sets, selections=selections,
                        min_fires=min_fires)
    lines = []
    for c, b in best.items():
        lines.append(f"{c:10s} blocks={'+'.join(x.split('.', 1)[1] for x in b['blocks'])} {b['selection']} "
                     f"{b['scaling']} min_fire={b['min_fire']} top_n={b['top_n']} γ={b['multiplier']:g}  "
                     f"UA {100*b['UA']:.1f} IRA {100*b['IRA']:.1f} CRA {100*b['CRA']:.1f}  score {100*b['score']:.1f}")
        params["saeuron"][c] = {k: b[k] for k in ("top_n", "multiplier", "scaling", "selection", "min_fire", "blocks")}
    return lines


def steer_variant(cs_params: dict, kind: str, gated: bool, orthogonal: bool | None,
                  contrast: bool | None) -> tuple[bool, bool]:
    """(orthogonal, contrast) of a steering sweep: an option left out (None) follows what params list for
    the kind, and only for the gated variant; contradicting options raise TuneOptionError."""
    from ..eval.shapes import contrast_kind, orthogonal_kind

    if contrast is None:
        contrast = contrast_kind(cs_params, kind) and gated and not orthogonal
    if contrast and orthogonal:
        raise TuneOptionError("--contrast replaces --orthogonal (matched prompts already cancel the other kinds); "
                              "give one of them")
    if orthogonal is None:
        orthogonal = orthogonal_kind(cs_params, kind) and gated and not contrast
    if orthogonal and not gated:
        raise TuneOptionError("--orthogonal is an option of the gated (ours) steering; drop --no-gated or --orthogonal")
    if contrast and not gated:
        raise TuneOptionError("--contrast is an option of the gated (ours) steering; drop --no-gated or --contrast")
    return bool(orthogonal), bool(contrast)


def tune_steer_params(pipe, clf, params: dict, kind: str, strengths: list[float], *, images: int, gated: bool,
                      orthogonal: bool, contrast: bool, per_concept: bool, progress: Advance = None) -> list[str]:
    """The removal λ of a kind (and per concept) into params["steer"] (the gated table, or "paper" for the
    ungated variant when params' own table is the other one)."""
    from ..eval.shapes import contrast_kind, orthogonal_kind, other_attribute_drop
    from ..eval.tune import sweep_steering
    from . import bundle

    cs = params["steer"]
    res = sweep_steering(pipe, clf, bundle.load_text_sae(), bundle.TEXT_HOOKPOINT, kind, strengths,
                         n=images // 2 or 8, progress=progress, baseline=cs.get("baseline"),
                         gate=gated, orthogonal=orthogonal, contrast=contrast)
    if gated:
        for key, on, listed in (("orthogonal", orthogonal, orthogonal_kind), ("contrast", contrast, contrast_kind)):
            kinds = [k for k in bundle.KINDS if listed(cs, k) and k != kind]
            cs[key] = kinds + [kind] if on else kinds
    lines = []
    for lam in res.strengths:
        r = res.rows[lam]
        lines.append(f"λ={lam:g}: present {100*sum(x['presence_after'] for x in r)/len(r):.1f} %, "
                     f"others kept {100*sum(x['others_agreement'] for x in r)/len(r):.1f} %")
    # the other variant's λ is kept beside ("paper": every prompt steered)
    table = cs if gated == bool(cs.get("gate")) else cs.setdefault("paper", {})
    table[kind] = res.pick()
    lines.append(f"picked λ={res.pick():g} for {kind} ({'gated' if gated else 'ungated'})")
    per = table.setdefault("concepts", {})
    per.pop(kind, None)
    if per_concept:
        per[kind] = res.pick_per_concept()
        for i, (c, lam) in enumerate(per[kind].items()):
            r = res.rows[lam][i]
            lines.append(f"  {c:10s} λ={lam:g}: present {100*r['presence_after']:.1f} %, worst other-attribute "
                         f"drop {100*other_attribute_drop(r):.1f} pts, prompts without it {100*r['others_agreement']:.1f} %")
    if not per:
        table.pop("concepts")
    return lines


def tune_steer_add_params(pipe, clf, params: dict, strengths: list[float], progress: Advance = None) -> list[str]:
    """The λ > 0 that adds a style into params["steer"]["add_style"]: the weakest that adds it to ≥ 70 % of
    images while keeping ≥ 90 % of the rest, else the best sum of both."""
    from ..eval.tune import sweep_adding
    from . import bundle

    res = sweep_adding(pipe, clf, bundle.load_text_sae(), bundle.TEXT_HOOKPOINT, strengths,
                       progress=progress, baseline=params["steer"].get("baseline"))
    lines = [f"λ={lam:g}: style found {100*r['found']:.1f} %, object/colour kept {100*r['kept']:.1f} %"
             for lam, r in res.items()]
    good = [lam for lam, r in res.items() if r["found"] >= 0.7 and r["kept"] >= 0.9]
    params["steer"]["add_style"] = min(good) if good else max(res, key=lambda k: res[k]["found"] + res[k]["kept"])
    lines.append(f"picked λ={params['steer']['add_style']:g} for adding a style")
    return lines


def robust_steer_settings(strengths, implicit, from_steps=(0,), detectors=(None,),
                          match: str = "embedding") -> list[tuple]:
    """The robust-steer candidates as family_candidates settings (λ, implicit fraction, None, match, first
    step of the implicit fraction, detector): λ × fraction × step × detector, where a detector is None or
    (probe step, threshold) with the step one of bundle.PROBE_STEPS. A detector gates only from a later
    step (FamilyGate), so a pair whose probe step is not below the first step is left out; a detector that
    no listed step follows, or a value out of range, raises TuneOptionError (checked before any generation)."""
    import itertools
    import math

    from .bundle import PROBE_STEPS

    for imp in implicit:
        if not isinstance(imp, (int, float)) or not math.isfinite(imp) or imp < 0:
            raise TuneOptionError(f"implicit fractions must be finite numbers >= 0, got {imp!r}")
    for s in from_steps:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise TuneOptionError(f"first steps of the implicit fraction must be integers >= 0, got {s!r}")
    for det in detectors:
        if det is None:
            continue
        step, thr = det
        if step not in PROBE_STEPS:
            raise TuneOptionError(f"detector step {step!r}: the shipped probes read steps "
                                  f"{', '.join(map(str, PROBE_STEPS))}")
        if not 0 <= thr <= 1:
            raise TuneOptionError(f"detector threshold must be a probability in [0, 1], got {thr!r}")
        if not any(step < s for s in from_steps):
            raise TuneOptionError(f"detector {step}:{thr:g} reads probe step {step}, not below any from step "
                                  f"({', '.join(map(str, from_steps))}): a detector gates only from a later step")
    return [(lam, imp, None, match, start, None if det is None else (int(det[0]), float(det[1])))
            for lam, imp, start, det in itertools.product(strengths, implicit, from_steps, detectors)
            if det is None or det[0] < start]


def tune_robust_params(pipe, clf, params: dict, method: str, kind: str, *, concepts_per_kind: int,
                       strengths: list[float] = (), implicit: list[float] = (), top_n: list[int] = (),
                       gammas: list[float] = (), min_fires: list[int] = (),
                       block_sets: list[tuple[str, ...]] = (), windows: list = (None,), match: str = "embedding",
                       per_concept: bool = False, edits: list[str] = ("scale",),
                       from_steps: list[int] = (0,), detectors: list = (None,),
                       progress: Advance = None) -> list[str]:
    """The generalization score (world/robust_tune.py) over named, implicit and rest prompts of the tuning
    split, one winner for the kind: robust-steer picks (λ, implicit fraction, first step of the implicit
    fraction, detector) of the FamilyGate removal (`robust_steer_settings`: the product, less the pairs a
    detector cannot gate) into params["steer"] ({kind: λ, "family": {kind: fraction}, "family_from_step":
    {kind: step} (none for 0), "family_detector": {kind: {"step": s, "threshold": p}} (none for no detector);
    a "family_negative" of the kind is dropped: the candidates use the implicit fraction on both branches);
    robust-saeuron picks (blocks, top-n, γ,
    evidence gate, window, edit) of the block-output edit with "specific" selection for every concept of the kind,
    or with per_concept each scored concept's own winner (the others get the kind's), and prints every candidate's
    axes per concept. `edits`: "scale" (z·γ) and/or "replace" (firing features set to the other concepts' mean),
    "replace_patch", "mean_patch" (interventions/ablate.py; every edit but scale ignores γ, so it is run once per
    other setting, at the first γ). `match` is the FamilyGate's
    word matcher ("embedding" follows the synonyms the text encoder learned; "tokens" is a prompt filter)."""
    import itertools

    from . import bundle, robust_tune
    from .generalization import GeneralizationConfig

    cfg = GeneralizationConfig(concepts_per_kind=concepts_per_kind, kinds=(kind,))
    if method == "robust-steer":
        settings = robust_steer_settings(strengths, implicit, from_steps, detectors, match)
        text_sae = bundle.load_text_sae()
        cands = robust_tune.family_candidates(pipe, text_sae, settings, kinds=(kind,))
        keys = dict(zip(cands, settings))
        res = robust_tune.tune(pipe, clf, cands, cfg, paired=False, progress=progress)
        lam, imp, _, _, start, det = keys[res.best]
        steer = params["steer"]
        steer[kind] = lam
        steer.setdefault("family", {})[kind] = imp
        steer["match"] = match
        steer.get("family_negative", {}).pop(kind, None)   # every candidate ran without a negative-branch fraction
        steer.get("family_rewind", {}).pop(kind, None)     # ... and without a rewind
        steer.get("family_rival", {}).pop(kind, None)      # ... or a scale on flagged rival prompts
        if start:
            steer.setdefault("family_from_step", {})[kind] = start
        else:
            steer.get("family_from_step", {}).pop(kind, None)
        if det is not None:
            steer.setdefault("family_detector", {})[kind] = {"step": det[0], "threshold": det[1]}
        else:
            steer.get("family_detector", {}).pop(kind, None)
        params["steer"].get("concepts", {}).pop(kind, None)
    elif method == "robust-saeuron":
        names = sorted({b for bs in block_sets for b in bs})
        blocks = {kind: bundle.load_blocks(kind, names)}
        settings = [{"blocks": list(b), "top_n": n, "multiplier": g, "scaling": "latent", "selection": "specific",
                     "min_fire": mf, **({"window": list(w)} if w else {}), **({"edit": e} if e != "scale" else {})}
                    for e, b, n, g, mf, w in itertools.product(edits or ("scale",), block_sets, top_n, gammas, min_fires,
                                                               windows or (None,))
                    if e == "scale" or g == gammas[0]]   # only scale uses γ: one run, not one per γ
        cands = robust_tune.saeuron_candidates(pipe, blocks, settings, kinds=(kind,))
        keys = dict(zip(cands, settings))
        res = robust_tune.tune(pipe, clf, cands, cfg, paired=True, progress=progress)
        axes = concept_axes_lines(res)
        for c in bundle.KINDS[kind]:
            params["saeuron"][c] = dict(keys[res.best])
        if per_concept:
            lines = []
            for (_, c), (name, v, d) in res.best_per_concept().items():
                params["saeuron"][c] = dict(keys[name])
                lines.append(f"winner ({c}): {name}  violation {v:.2f} damage {d:.2f}")
            return [f"{v:7.2f} {d:6.2f}  {n}" for n, v, d in res.table()] + axes + lines
        return [f"{v:7.2f} {d:6.2f}  {n}" for n, v, d in res.table()] + axes + [f"winner ({kind}): {res.best}"]
    else:
        raise TuneOptionError(f"method must be robust-steer or robust-saeuron, not {method!r}")
    return [f"{v:7.2f} {d:6.2f}  {n}" for n, v, d in res.table()] + [f"winner ({kind}): {res.best}"]


def concept_axes_lines(res) -> list[str]:
    """Every candidate's axes per concept (tuning split): violation, named and implicit presence with the plain
    model's in brackets, held-out names, rest accuracy, paired change, TV and FD ratio."""
    from .robust_tune import violation

    pct = lambda v: "  –  " if v is None or v != v else f"{100 * v:4.0f}%"  # noqa: E731
    lines = [f"{'concept':10s} {'viol':>5s} {'named (plain)':>13s} {'implicit (plain)':>16s} {'held-out':>8s} "
             f"{'rest':>5s} {'paired':>6s} {'TV':>5s} {'FD':>5s}  candidate"]
    for name, rows in res.rows.items():
        for r in rows:
            fd = r.get("fd_ratio")
            lines.append(f"{r['concept']:10s} {violation(r, res.paired):5.2f} {pct(r['named']):>6s} ({pct(r['named_plain'])}) "
                         f"{pct(r['implicit_all']):>9s} ({pct(r['implicit_all_plain'])}) {pct(r.get('held_out')):>8s} "
                         f"{pct(r['rest_accuracy']):>5s} {pct(r['paired_change']):>6s} {r['tv_other']:5.2f} "
                         f"{'  –  ' if fd is None or fd != fd else f'{fd:5.2f}'}  {name}")
    return lines
