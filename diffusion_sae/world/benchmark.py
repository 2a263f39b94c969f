"""The ShapesCanvas benchmark runs behind `eval shapes`, `eval attack` and `tune`: which SAEs and settings
each one loads, its defaults, which results it keeps and where it writes them. The CLI only parses and
prints; this module decides.

Every run judges images with the bundled classifier; `extra` methods are any other interventions, each
a zero-argument context-manager factory (e.g. one opened from interventions/registry.py), measured on
the same grid as the two papers' methods.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional

from ..errors import DiffusionSAEError
from .config import GUIDANCE

Progress = Optional[Callable[[str, int], None]]   # progress(stage, images or concepts done since last call)
ContextFactory = Callable[[], ContextManager]


class BenchmarkOptionError(DiffusionSAEError, ValueError):
    """An option of a benchmark run that cannot work (named in one line)."""


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _load_world():
    from . import assets

    return assets.load_pipeline(), assets.load_classifier()


# ---------------------------------------------------------------------------------------------
# eval shapes
# ---------------------------------------------------------------------------------------------
@dataclass
class ShapesEvalOptions:
    quick: bool = False
    seeds: int = 1
    steps: int = 25
    guidance: float = GUIDANCE
    faithful: bool = True
    concepts_per_kind: int | None = None
    steer_seeds: int | None = None          # default 8, 4 with quick
    generalization: bool = True
    gen_concepts: int | None = None          # default 2 with quick (keeps --quick under 12 min), all otherwise
    attack_concepts: int | None = None       # default 1 with quick, 3 otherwise; 0 = none
    gen_groups: int | None = None            # several at once / one after another: first N styles and objects
                                             # (default 3; 0 with quick, and 0 = none)
    attack_steps: int | None = None          # default 10 with quick, 40 otherwise
    # images per implicit set and per empty-prompt set: default 64 (12 with quick). The bar is a fifth of the plain
    # base rate; at 16 + 16 a concept the plain model draws in 6 % of them is 1-2 images, so one image decided it.
    gen_implicit: int | None = None
    builtin: bool = True                     # the two papers' methods (False: only `extra` methods)
    grid: bool = True                        # the UA / IRA / CRA grid tables (False: generalization only)


def extra_methods_rows(pipe, clf, extra: dict[str, ContextFactory], opts: ShapesEvalOptions,
                       progress: Progress = None) -> dict:
    """Each extra method on the benchmark grid: the judge's agreement with the prompt per attribute, plain
    and under the method, and the Fréchet distance of the judge's features to the plain images (how far the
    method moves the images at all; not FID)."""
    from ..eval.metrics import classifier_frechet_distance
    from ..eval.shapes import KINDS, ShapesBench, grid, quick_grid

    bench = ShapesBench(pipe, clf, opts.steps, opts.guidance,
                        progress=(lambda n: progress("extra methods", n)) if progress else None)
    ps = grid(opts.seeds)
    if opts.quick:
        ps = quick_grid(ps)
    plain = bench.run(ps)
    rows = {"plain": {k: plain.accuracy(k) for k in KINDS}}
    for name, factory in extra.items():
        j = bench.run(ps, factory)
        fd = classifier_frechet_distance(j.features.double().numpy(), plain.features.double().numpy()).value
        rows[name] = {**{k: j.accuracy(k) for k in KINDS}, "fd_to_plain": max(0.0, fd),
                      "changed_predictions": float(sum((j.pred[k] != plain.pred[k]).float().mean() for k in KINDS)
                                                   / len(KINDS))}
    return {"prompts": len(ps.prompts), "images_generated": bench.images_generated, "rows": rows}


def extra_methods_section(res: dict):
    from ..eval.report import Section, Table

    kinds = ("object", "style", "colour")
    rows = [[name] + [round(100 * r[k], 1) for k in kinds]
            + ([round(r["fd_to_plain"], 3), round(100 * r["changed_predictions"], 1)] if name != "plain" else ["", ""])
            for name, r in res["rows"].items()]
    return Section("Registered interventions on the benchmark grid",
                   f"{res['prompts']} grid prompts; agreement of the judge with the prompt (%), the Fréchet distance "
                   "of the judge's features to the plain images (0 = unchanged; not FID) and the share of the judge's "
                   "predictions that changed (%).",
                   [Table("Registered interventions", ["method"] + [f"{k} agreement" for k in kinds]
                          + ["Fréchet distance to plain", "predictions changed"], rows)])


def run_shapes_eval(out: Path, opts: ShapesEvalOptions, extra: dict[str, ContextFactory] | None = None,
                    progress: Progress = None, pipe=None, clf=None) -> tuple[dict, dict]:
    """The benchmark report in `out` (report.md/.json/.html, results.json); returns (results, report paths).
    `extra`: {name: context factory} measured on the grid beside the built-in methods."""
    from ..eval.report import write_report
    from ..eval.shapes import ShapesConfig, run_shapes_benchmark, shapes_report_sections
    from . import bundle

    if not opts.builtin and not extra:
        raise BenchmarkOptionError("nothing to run: the built-in methods are off and no other method is given")
    group = opts.gen_groups if opts.gen_groups is not None else (0 if opts.quick else 3)
    scored = opts.gen_concepts or opts.concepts_per_kind or (2 if opts.quick else None)
    if opts.generalization and group and (group < 2 or group > len(bundle.STYLES)):
        raise BenchmarkOptionError(f"--gen-groups {group}: give 0 (none) or 2 to {len(bundle.STYLES)} concepts")
    if opts.generalization and group and scored and group > scored:
        raise BenchmarkOptionError(f"--gen-groups {group} is more than the {scored} concepts per kind the "
                                   "generalization table scores: raise --gen-concepts or lower --gen-groups")
    t0 = time.perf_counter()
    if pipe is None:
        pipe, clf = _load_world()
    res: dict = {"images_generated": 0, "settings": {}}
    sections: list = []
    if opts.builtin:
        text_sae = bundle.load_text_sae()
        blocks = {k: bundle.load_blocks(k) for k in ("style", "object")}
        quick = opts.quick
        cfg = ShapesConfig(quick=quick, seeds=opts.seeds, steps=opts.steps, guidance=opts.guidance,
                           faithful=opts.faithful, max_concepts=opts.concepts_per_kind,
                           steer_seeds=opts.steer_seeds or (4 if quick else 8))
        if opts.grid:
            res = run_shapes_benchmark(pipe, clf, text_sae, blocks, bundle.load_params(), cfg,
                                       progress=(lambda n: progress("eval shapes", n)) if progress else None)
            sections = shapes_report_sections(res)
        if opts.generalization:
            from ..eval.attack import AttackConfig
            from . import generalization as gen

            gcfg = gen.eval_config(quick, opts.gen_concepts or opts.concepts_per_kind, opts.steps, opts.guidance,
                                   opts.gen_implicit)
            methods = gen.default_methods(pipe, text_sae, blocks, bundle.load_params(), group_size=group)
            tick = (lambda *a: progress("generalization", 1)) if progress else None
            g = gen.run_generalization(pipe, clf, methods, gcfg,
                                       progress=(lambda n: progress("generalization", n)) if progress else None)
            n_att = opts.attack_concepts if opts.attack_concepts is not None else (1 if quick else 3)
            if n_att:
                acfg = AttackConfig(steps=opts.attack_steps or (10 if quick else 40), n_images=8 if quick else 16)
                gen.add_adversarial(pipe, clf, methods, g, n_att, acfg, progress=tick)
            res["generalization"] = g
            res["images_generated"] += g["images_generated"]
            sections.insert(0, gen.report_section(g))
    if extra:
        x = extra_methods_rows(pipe, clf, extra, opts, progress)
        res["extra_methods"] = x
        res["images_generated"] += x["images_generated"]
        sections.append(extra_methods_section(x))
    res["wall_seconds"] = time.perf_counter() - t0
    settings = {"judge": "bundled ShapesCanvas classifier (argmax per head)", "sampler": f"DDIM {opts.steps} steps",
                "guidance": opts.guidance,
                "grid": "object x style, colour cycle" + (" (half: i+j even)" if opts.quick else ""),
                "seeds": opts.seeds, "wall_seconds": round(res["wall_seconds"], 1), **res["settings"]}
    paths = write_report(out, "ShapesCanvas benchmark", sections, settings)
    _write_json(out / "results.json", res)
    return res, paths


def shapes_eval_lines(res: dict) -> list[str]:
    """The summary printed after `eval shapes`."""
    from ..eval.shapes import summary_lines

    lines = summary_lines(res) if "base" in res else []
    if "generalization" in res:
        from .generalization import summary_lines as gen_summary

        lines.append("generalization (held-out seeds; named / held-out names / implicit / adversarial):")
        lines += ["  " + line for line in gen_summary(res["generalization"])]
        from .generalization import noise_verdicts

        tally: dict = {}
        for m, *_, verdict in noise_verdicts(res["generalization"]):
            tally.setdefault(m, {}).setdefault(verdict, 0)
            tally[m][verdict] += 1
        lines += [f"  {m}: bar misses {', '.join(f'{n} {v}' for v, n in sorted(t.items()))}" for m, t in tally.items()]
    for name, r in res.get("extra_methods", {}).get("rows", {}).items():
        if name != "plain":
            lines.append(f"{name}: agreement object {100 * r['object']:.1f} style {100 * r['style']:.1f} colour "
                         f"{100 * r['colour']:.1f} %, Fréchet distance to plain {r['fd_to_plain']:.3f}, "
                         f"predictions changed {100 * r['changed_predictions']:.1f} %")
    return lines


# ---------------------------------------------------------------------------------------------
# eval attack
# ---------------------------------------------------------------------------------------------
ATTACK_KINDS = ("style", "object")


def run_attack_eval(out: Path, kind: str, concepts, cfg, extra: dict[str, ContextFactory] | None = None,
                    builtin: bool = True, progress: Progress = None, pipe=None, clf=None) -> tuple[dict, dict]:
    """Adversarial prompts against the plain model, both papers' methods at their shipped settings (when
    `builtin`) and each `extra` method; report and results.json in `out`; returns (results, report paths)."""
    from ..eval.attack import attack_report_section, run_attack_benchmark, saeuron_builder, steerers_builder
    from ..eval.report import write_report
    from . import bundle

    if kind not in ATTACK_KINDS:
        raise BenchmarkOptionError(f"--kind must be style or object, not {kind!r}")
    cfg.check()
    if pipe is None:
        pipe, clf = _load_world()
    interventions: dict = {"none": lambda c: None}
    if builtin:
        params = bundle.load_params()
        interventions["SAeUron"] = saeuron_builder(pipe, bundle.load_blocks(kind), params["saeuron"])
        interventions["Concept Steerers"] = steerers_builder(pipe, bundle.load_text_sae(), kind, params["steer"])
        if params["steer"].get("paper"):
            interventions["Concept Steerers (ungated, paper)"] = steerers_builder(
                pipe, bundle.load_text_sae(), kind, params["steer"], paper=True)
    for name, factory in (extra or {}).items():
        interventions[name] = lambda c, f=factory: f     # the same edit whatever concept is attacked
    res = run_attack_benchmark(pipe, clf, interventions, kind, concepts or None, cfg,
                               progress=(lambda *a: progress("attack", 1)) if progress else None)
    paths = write_report(out, "Adversarial prompts on ShapesCanvas", [attack_report_section(res)], res["settings"])
    _write_json(out / "results.json", res)
    return res, paths


def attack_lines(res: dict) -> list[str]:
    lines = []
    for name, rows in res["rows"].items():
        asr = sum(r["asr"] for r in rows) / len(rows)
        under = sum(r["presence_intervened"] for r in rows) / len(rows)
        lines.append(f"{name:36s} present under intervention {100 * under:5.1f} %  attack success {100 * asr:5.1f} %")
    return lines
