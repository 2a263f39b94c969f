"""`diffusion-sae demo`: both methods on the bundled ShapesCanvas model, measured, in a few minutes.

1. Concept Steerers removes a style ("striped") from prompts that ask for it.
2. SAeUron unlearns an object ("star") from prompts that ask for it, in every style.
3. Concept Steerers adds a style ("dotted") to prompts that name none.
Plus a strength sweep of (1). Writes demo/: before_after.png, strength_sweep.png, report.md/.json/.html.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..world.config import COLOUR_NAMES, OBJECTS, STYLES, caption, eval_prompt
from ..world.evaluate import PromptSet
from .shapes import ShapesBench, concept_text

REMOVE_STYLE = "striped"
UNLEARN_OBJECT = "star"
ADD_STYLE = "dotted"
SWEEP = (0.0, -0.5, -1.0, -2.0, -3.0)


def _set(rows) -> PromptSet:
    ps = PromptSet([], [], [], [], [])
    for p, seed, o, s, c in rows:
        ps.prompts.append(p), ps.seeds.append(seed), ps.objects.append(o), ps.styles.append(s), ps.colours.append(c)
    return ps


def style_prompts(style: str, seeds: int = 2) -> PromptSet:
    si = STYLES.index(style)
    return _set([(eval_prompt(o, style, COLOUR_NAMES[(i + k) % 6]), 100 + k, i, si, (i + k) % 6)
                 for k in range(seeds) for i, o in enumerate(OBJECTS)])


def object_prompts(obj: str, seeds: int = 2) -> PromptSet:
    oi = OBJECTS.index(obj)
    return _set([(eval_prompt(obj, s, COLOUR_NAMES[(j + k) % 6]), 200 + k, oi, j, (j + k) % 6)
                 for k in range(seeds) for j, s in enumerate(STYLES)])


def other_prompts(kind: str, concept: str, n: int = 16) -> PromptSet:
    """Prompts that do not ask for the concept (to check that the rest is kept)."""
    rows = []
    for k in range(n):
        o, s, c = k % 10, (3 * k + 1) % 8, (5 * k + 2) % 6
        if (kind == "style" and STYLES[s] == concept) or (kind == "object" and OBJECTS[o] == concept):
            s, o = (s + 1) % 8, (o + 1) % 10
        rows.append((eval_prompt(OBJECTS[o], STYLES[s], COLOUR_NAMES[c]), 300 + k, o, s, c))
    return _set(rows)


def plain_prompts(seeds: int = 1) -> PromptSet:
    return _set([(caption(o, None, COLOUR_NAMES[(i + k) % 6], "a {colour} {object}"), 400 + k, i, -1, (i + k) % 6)
                 for k in range(seeds) for i, o in enumerate(OBJECTS)])


def _pct(x):
    return round(100 * float(x), 1)


def run_demo(out_dir: str | Path, progress=None, seeds: int = 2) -> dict:
    from ..interventions.steer import concept_steering, steer_text_encoder
    from .shapes import DEFAULT_SAEURON, removal_steering, saeuron_context, steer_strength
    from ..world import assets, bundle
    from .report import Figure, Section, Table, plot_image_grid, plot_strength_sweep, write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = assets.load_pipeline()
    clf = assets.load_classifier()
    text_sae = bundle.load_text_sae()
    object_blocks = bundle.load_blocks("object")
    params = bundle.load_params()
    bench = ShapesBench(pipe, clf, bundle.STEPS, bundle.GUIDANCE, keep_images=True, progress=progress)
    hp = bundle.TEXT_HOOKPOINT
    si, oi, ai = STYLES.index(REMOVE_STYLE), OBJECTS.index(UNLEARN_OBJECT), STYLES.index(ADD_STYLE)
    res: dict = {}

    # 1. Concept Steerers: remove a style.
    lam = steer_strength(params.get("steer", {}), "style", REMOVE_STYLE)
    baseline = params.get("steer", {}).get("baseline")
    gated = bool(params.get("steer", {}).get("gate"))
    unit = removal_steering(text_sae, pipe, "style", REMOVE_STYLE, 1.0, params.get("steer", {}))
    asked, rest = style_prompts(REMOVE_STYLE, seeds), other_prompts("style", REMOVE_STYLE)
    b_asked, b_rest = bench.run(asked), bench.run(rest)
    st = unit.scaled(lam)
    s_asked = bench.run(asked, lambda: steer_text_encoder(pipe, st))
    s_rest = bench.run(rest, lambda: steer_text_encoder(pipe, st))
    all_ = torch.ones(len(asked.prompts), dtype=torch.bool)
    res["remove_style"] = {
        "concept": REMOVE_STYLE, "strength": lam, "images": len(asked.prompts),
        "present_before": b_asked.presence("style", si, all_), "present_after": s_asked.presence("style", si, all_),
        "object_before": b_asked.accuracy("object"), "object_after": s_asked.accuracy("object"),
        "colour_before": b_asked.accuracy("colour"), "colour_after": s_asked.accuracy("colour"),
        "others_before": min(b_rest.accuracy(k) for k in ("object", "style", "colour")),
        "others_after": min(s_rest.accuracy(k) for k in ("object", "style", "colour")),
    }

    # 2. SAeUron: unlearn an object.
    p = params.get("saeuron", {}).get(UNLEARN_OBJECT, DEFAULT_SAEURON)
    o_asked, o_rest = object_prompts(UNLEARN_OBJECT, seeds), other_prompts("object", UNLEARN_OBJECT)
    ob_asked, ob_rest = bench.run(o_asked), bench.run(o_rest)
    ctx = lambda: saeuron_context(pipe, object_blocks, {UNLEARN_OBJECT: p})  # noqa: E731
    u_asked, u_rest = bench.run(o_asked, ctx), bench.run(o_rest, ctx)
    all_o = torch.ones(len(o_asked.prompts), dtype=torch.bool)
    res["unlearn_object"] = {
        "concept": UNLEARN_OBJECT, "params": p, "images": len(o_asked.prompts),
        "present_before": ob_asked.presence("object", oi, all_o), "present_after": u_asked.presence("object", oi, all_o),
        "style_before": ob_asked.accuracy("style"), "style_after": u_asked.accuracy("style"),
        "others_before": ob_rest.accuracy("object"), "others_after": u_rest.accuracy("object"),
    }

    # 3. Concept Steerers: add a style to prompts that name none.
    lam_add = float(params.get("steer", {}).get("add_style", 1.0))
    plain = plain_prompts(max(1, seeds // 2))
    a_before = bench.run(plain)
    add = concept_steering(text_sae, pipe, hp, concept_text("style", ADD_STYLE), lam_add, baseline=baseline)
    a_after = bench.run(plain, lambda: steer_text_encoder(pipe, add))
    all_p = torch.ones(len(plain.prompts), dtype=torch.bool)
    res["add_style"] = {"concept": ADD_STYLE, "strength": lam_add, "images": len(plain.prompts),
                        "present_before": a_before.presence("style", ai, all_p),
                        "present_after": a_after.presence("style", ai, all_p),
                        "object_after": a_after.accuracy("object"), "colour_after": a_after.accuracy("colour")}

    # Strength sweep of the style removal.
    small_a, small_r = style_prompts(REMOVE_STYLE, 1), other_prompts("style", REMOVE_STYLE, 10)
    sweep = {"present": [], "others kept": []}
    all_s = torch.ones(len(small_a.prompts), dtype=torch.bool)
    for s in SWEEP:
        sc = unit.scaled(s)
        ja = bench.run(small_a, lambda sc=sc: steer_text_encoder(pipe, sc))
        jr = bench.run(small_r, lambda sc=sc: steer_text_encoder(pipe, sc))
        sweep["present"].append(100 * ja.presence("style", si, all_s))
        sweep["others kept"].append(100 * min(jr.accuracy(k) for k in ("object", "style", "colour")))
    res["sweep"] = {"strengths": list(SWEEP), **sweep}

    # Generalization: the same two erasures on held-out names, implicit prompts (the attribute left out,
    # the empty prompt) and prompts naming other concepts, at evaluation seeds no tuning used.
    from ..world import generalization as gen

    gcfg = gen.GeneralizationConfig(only={"style": (REMOVE_STYLE,), "object": (UNLEARN_OBJECT,)},
                                    implicit=12, empty=12, kinds=("style", "object"))
    methods = {"Concept Steerers": {"style": lambda c: (lambda: steer_text_encoder(pipe, st))},
               "SAeUron": {"object": lambda c: ctx}}
    g = gen.run_generalization(pipe, clf, methods, gcfg, progress=progress)
    res["generalization"] = g

    # Figures: before / after grid and the sweep.
    n = 6
    imgs, rows = [], []
    for label, before, after in ((f"remove '{REMOVE_STYLE}'", b_asked, s_asked),
                                 (f"unlearn '{UNLEARN_OBJECT}'", ob_asked, u_asked),
                                 (f"add '{ADD_STYLE}'", a_before, a_after)):
        for tag, j in (("before", before), ("after", after)):
            rows.append(f"{label}\n{tag}")
            imgs += [img.permute(1, 2, 0).clamp(0, 1).numpy() for img in j.images[:n]]
    grid_fig = plot_image_grid(imgs, len(rows), n, row_labels=rows,
                               title="diffusion-sae demo: six prompts per row group")
    sweep_fig = plot_strength_sweep(list(SWEEP), {f"'{REMOVE_STYLE}' present (%)": sweep["present"]},
                                    {"other attributes kept (%)": sweep["others kept"]},
                                    removal_label="style present (%)", retained_label="agreement kept (%)",
                                    xlabel="steering strength λ", title=f"Concept Steerers: removing '{REMOVE_STYLE}'")
    r1, r2, r3 = res["remove_style"], res["unlearn_object"], res["add_style"]
    table = Table("Classifier-measured results (%)", ["experiment", "concept present before", "after",
                                                       "rest kept before", "after", "images"],
                  [[f"Concept Steerers remove style '{REMOVE_STYLE}' (λ={lam:g}{', gated' if gated else ''})", _pct(r1["present_before"]),
                    _pct(r1["present_after"]), _pct(r1["others_before"]), _pct(r1["others_after"]), r1["images"]],
                   [f"SAeUron unlearn object '{UNLEARN_OBJECT}' (top {p.get('top_n')}, γ={p.get('multiplier'):g}, "
                    f"{p.get('scaling', 'mean')} scaling, {len(p.get('blocks') or [1])} block(s))",
                    _pct(r2["present_before"]), _pct(r2["present_after"]), _pct(r2["others_before"]),
                    _pct(r2["others_after"]), r2["images"]],
                   [f"Concept Steerers add style '{ADD_STYLE}' (λ={lam_add:g})", _pct(r3["present_before"]),
                    _pct(r3["present_after"]), "", "", r3["images"]]],
                  "present = share of images the judge labels with the concept; rest kept = agreement on prompts "
                  "that do not name it (removal) / on the other concepts (unlearning)")
    gen_rows = [[f"{m} {r['kind']} '{r['concept']}'", _pct(r["named"]),
                 "–" if r.get("held_out") is None else _pct(r["held_out"]),
                 f"{_pct(r['implicit'])} ({_pct(r['implicit_plain'])})", f"{_pct(r['empty'])} ({_pct(r['empty_plain'])})",
                 f"{_pct(r['rest_accuracy'])} ({_pct(r['rest_accuracy_plain'])})", _pct(r["paired_change"])]
                for m, rs in g["rows"].items() for r in rs]
    gen_table = Table("The same erasures where the prompt does not name the concept (%, plain model in brackets)",
                      ["erasure", "named", "held-out names", "attribute left out", "empty prompt",
                       "other concepts kept", "paired change"], gen_rows,
                      "fresh evaluation seeds; held-out names need a world v2 pipeline (– otherwise); paired change = "
                      "share of implicit-prompt seeds without the concept whose judged labels change")
    secs = [Section("Results", "ShapesCanvas, DDIM 25 steps, guidance 5, judged by the bundled classifier.", [table, gen_table],
                    [Figure("before_after", "Before / after for each experiment", grid_fig),
                     Figure("strength_sweep", "Strength sweep of the style removal", sweep_fig)])]
    paths = write_report(out, "diffusion-sae demo", secs, {"model": str(assets.pipeline_dir()), "params": params,
                                                            "steps": bundle.STEPS, "guidance": bundle.GUIDANCE})
    for name in ("before_after", "strength_sweep"):
        src = out / "figures" / f"{name}.png"
        if src.exists():
            (out / f"{name}.png").write_bytes(src.read_bytes())
    (out / "results.json").write_text(json.dumps(res, indent=2))
    res["paths"] = {k: str(v) for k, v in paths.items()}
    res["images_generated"] = bench.images_generated
    return res
