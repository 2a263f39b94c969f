"""The ShapesCanvas benchmark commands: `eval attack`, `eval shapes`, `tune`, `demo` (world/benchmark.py and
world/tuning.py hold what they run)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..world.benchmark import ATTACK_KINDS
from ..world.config import GUIDANCE as WORLD_GUIDANCE
from .common import (METHOD_HELP, METHOD_SAE_HELP, SET_HELP, SHAPES, fail, load_model, method_config, method_context,
                     method_intervention, parse_strengths, parse_window, progress_bar)


def eval_attack(kind: str = typer.Option("style", help="style or object."),
                concept: Optional[list[str]] = typer.Option(None, help="Concepts to attack (default: all of the kind)."),
                steps: int = typer.Option(40, help="Optimisation steps per concept."),
                images: int = typer.Option(16, help="Images judged per concept and condition."),
                tokens: int = typer.Option(5, help="Adversarial tokens prepended to the prompt."),
                seed: int = 0,
                out: Path = typer.Option(Path("eval-attack"), help="Report folder."),
                method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP + " Measured beside the built-in methods."),
                set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
                method_sae: Optional[Path] = typer.Option(None, "--sae", help=METHOD_SAE_HELP),
                builtin: bool = typer.Option(True, help="Run the two papers' methods (--no-builtin with --method: "
                                             "only the registered one).")):
    """UnlearnDiffAtk-style adversarial prompts on ShapesCanvas: concept presence before / after unlearning, both methods."""
    from ..eval.attack import AttackConfig
    from ..world import assets
    from ..world.benchmark import attack_lines, run_attack_eval

    if kind not in ATTACK_KINDS:
        fail(f"--kind must be style or object, not {kind!r}")
    spec, config = method_config(method, set_) if method else (None, None)
    if not builtin and spec is None:
        fail("--no-builtin leaves nothing to attack: give --method NAME")
    pipe, clf = load_model(SHAPES), assets.load_classifier()
    extra = {method: method_context(pipe, method_intervention(spec, config, method_sae, pipe))} if spec else None
    try:
        cfg = AttackConfig(steps=steps, n_images=images, n_tokens=tokens, seed=seed)
        with progress_bar() as p:
            task = p.add_task("attack", total=None, info="concepts")
            res, paths = run_attack_eval(out, kind, concept or None, cfg, extra=extra, builtin=builtin, pipe=pipe,
                                         clf=clf, progress=lambda stage, n: p.advance(task, n))
    except ValueError as e:
        fail(str(e))
    for line in attack_lines(res):
        typer.echo(line)
    typer.echo(f"report: {paths['md']}")


def eval_shapes(quick: bool = typer.Option(False, "--quick", help="Half grid, 1 seed (≤ 10 min on 2 cores)."),
                seeds: int = typer.Option(1, help="Images per object x style pair."),
                out: Path = typer.Option(Path("eval-shapes"), help="Report folder."),
                no_faithful: bool = typer.Option(False, help="Skip SAeUron's faithful-mode table."),
                concepts_per_kind: Optional[int] = typer.Option(None, help="Only the first N concepts of each kind (smoke runs)."),
                steer_seeds: Optional[int] = typer.Option(None, help="Concept Steerers removal: images per grid prompt that "
                                                          "names the removed concept (the other prompts get --seeds); "
                                                          "default 8, 4 with --quick."),
                generalization: bool = typer.Option(True, help="Also judge every erasure on held-out names, implicit "
                                                    "and adversarial prompts (the generalization table)."),
                grid: bool = typer.Option(True, help="The UA / IRA / CRA grid tables (--no-grid: only the "
                                          "generalization table, about a third of the full run's time)."),
                gen_concepts: Optional[int] = typer.Option(None, help="Generalization table: first N concepts per kind "
                                                           "(default 2 with --quick, all otherwise)."),
                attack_concepts: Optional[int] = typer.Option(None, help="Adversarial column: concepts attacked per kind "
                                                              "(default 1 with --quick, 3 otherwise; 0 = none)."),
                gen_groups: Optional[int] = typer.Option(None, help="Generalization table: both shipped methods also remove "
                                                         "the first N styles and objects together, at once and one after "
                                                         "another (default 3, 0 with --quick; 0 = none)."),
                implicit: Optional[int] = typer.Option(None, help="Generalization table: images per implicit set (the "
                                                       "attribute left out) and per empty-prompt set (default 64, 12 "
                                                       "with --quick)."),
                attack_steps: Optional[int] = typer.Option(None, help="Adversarial column: optimisation steps "
                                                           "(default 10 with --quick, 40 otherwise)."),
                steps: int = 25, guidance: float = WORLD_GUIDANCE,
                method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP + " Measured beside the built-in methods."),
                set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
                method_sae: Optional[Path] = typer.Option(None, "--sae", help=METHOD_SAE_HELP),
                builtin: bool = typer.Option(True, help="Run the two papers' methods (--no-builtin with --method: "
                                             "only the registered one).")):
    """ShapesCanvas benchmark: remove / add / unlearn every concept with both methods, judged by the classifier."""
    from ..world import assets
    from ..world.benchmark import ShapesEvalOptions, run_shapes_eval, shapes_eval_lines

    opts = ShapesEvalOptions(quick=quick, seeds=seeds, steps=steps, guidance=guidance, faithful=not no_faithful,
                             concepts_per_kind=concepts_per_kind, steer_seeds=steer_seeds,
                             generalization=generalization, gen_concepts=gen_concepts,
                             attack_concepts=attack_concepts, attack_steps=attack_steps, builtin=builtin,
                             gen_groups=gen_groups, grid=grid, gen_implicit=implicit)
    if implicit is not None and implicit < 1:
        fail(f"--implicit {implicit}: give at least 1 image per implicit and empty set")
    if not grid and not generalization:
        fail("--no-grid with --no-generalization leaves nothing to measure")
    spec, config = method_config(method, set_) if method else (None, None)
    if not builtin and spec is None:
        fail("--no-builtin leaves nothing to measure: give --method NAME")
    pipe, clf = load_model(SHAPES), assets.load_classifier()
    extra = {method: method_context(pipe, method_intervention(spec, config, method_sae, pipe))} if spec else None
    with progress_bar() as p:
        tasks: dict = {}

        def advance(stage: str, n: int) -> None:
            if stage not in tasks:
                tasks[stage] = p.add_task(stage, total=None, info="images")
            p.advance(tasks[stage], n)

        res, paths = run_shapes_eval(out, opts, extra=extra, pipe=pipe, clf=clf, progress=advance)
    for line in shapes_eval_lines(res):
        typer.echo(line)
    typer.echo(f"{res['images_generated']} images in {res['wall_seconds']:.0f} s; report: {paths['md']}")


def tune_cmd(method: str = typer.Option("saeuron", help="saeuron (per-concept top-n and γ), steer (removal λ per kind), steer-add (λ > 0 adding a style), "
                                        "robust-steer / robust-saeuron (the shipped presets: one score over named, implicit and rest prompts)."),
             kind: str = typer.Option("style", help="style, object or colour."),
             concept: Optional[list[str]] = typer.Option(None, help="Concepts to tune (default: all of the kind)."),
             search: str = typer.Option("halving", help="saeuron: grid (official, (UA+IRA)/2) or halving (mean of UA, IRA, CRA)."),
             images: int = typer.Option(64, help="Images per configuration (grid) / in the final round (halving)."),
             strengths: str = typer.Option("-0.5,-1,-2,-3,-4", help="steer: strengths to sweep."),
             top_n: str = typer.Option("1,2,4,8", help="saeuron: features per step to try."),
             gammas: str = typer.Option("-1,-5,-10,-20,-30", help="saeuron: multipliers γ to try."),
             scalings: str = typer.Option("mean", help="saeuron: 'mean' (z·γ·μ, official), 'latent' (z·γ) or both, comma-separated."),
             selections: str = typer.Option("paper", help="saeuron: 'paper' (official scores, bar ν), 'specific' (per-patch specificity) or both, comma-separated."),
             min_fires: str = typer.Option("1", help="saeuron: evidence gates to try: edit a patch only where this many selected features fire together (1 = the paper)."),
             gated: bool = typer.Option(True, help="steer: gate each concept's steering on its word (ours) or steer every prompt (--no-gated, the paper)."),
             per_concept: bool = typer.Option(False, help="steer: also pick a λ per concept (saved under \"concepts\"; the kind's λ stays the default); "
                                              "robust-saeuron: each scored concept gets its own winning setting."),
             windows: str = typer.Option("none", help="robust-saeuron: timestep windows to try, ';' between them: 'none' (every step) "
                                         "or 'START-STOP' (edit at step indices START <= t < STOP), e.g. 'none;5-25;10-25'."),
             edits: str = typer.Option("scale", help="robust-saeuron: edits to try, ';' between them: 'scale' (firing features "
                                       "become z·γ, the paper), 'replace' (they become the other concepts' mean; γ ignored), 'replace_patch' (the firing "
                                       "patch becomes that code's reconstruction, SAE error dropped) or 'mean_patch' (the firing patch becomes "
                                       "the other concepts' mean patch), e.g. 'scale;replace_patch'."),
             match: str = typer.Option("embedding", help="robust-steer: how the FamilyGate finds a name in a prompt: 'embedding' (nearest word in the "
                                       "text encoder's token embeddings: follows learned synonyms) or 'tokens' (exact words: a prompt filter)."),
             orthogonal: Optional[bool] = typer.Option(None, help="steer (gated): make each steering orthogonal to the other kinds' concepts (ours; the kind is listed under \"orthogonal\" in params.json); default: as params.json says."),
             contrast: Optional[bool] = typer.Option(None, help="steer (gated): build each steering from matched example prompts, the concept against its rivals (ours; the kind is listed under \"contrast\" in params.json); default: as params.json says."),
             implicit: str = typer.Option("0,0.1,0.25", help="robust-steer: fractions of S on prompts that name no concept of the kind "
                                          "(finite, >= 0; above 1 pushes harder than on a named prompt, e.g. with a detector)."),
             from_steps: str = typer.Option("0", help="robust-steer: first denoising steps of the implicit fraction to try, "
                                            "comma-separated integers >= 0 (0: every step), e.g. '0,12'."),
             detectors: str = typer.Option("none", help="robust-steer: detectors to try, ';' between them: 'none' or 'STEP:THRESHOLD' "
                                           "(the implicit fraction acts only on samples the kind's shipped probe at STEP, one of "
                                           "5, 7, 9, 11, 15, 19, flags with p >= THRESHOLD in [0, 1]; only paired with a later --from-steps "
                                           "step), e.g. 'none;11:0.2'."),
             concepts_per_kind: int = typer.Option(2, help="robust-*: concepts of the kind scored (the first N)."),
             blocks: str = typer.Option("unet.up_blocks.1.attentions.1", help="saeuron: block sets to try, ';' between sets, '+' within one, e.g. 'unet.up_blocks.1.attentions.1;unet.up_blocks.1.attentions.0+unet.up_blocks.1.attentions.1'."),
             out: Optional[Path] = typer.Option(None, "--out", help="Write the shipped params updated with the winners "
                                                "to this JSON file (a preset; never the package's own params.json). "
                                                "Without it the winners are only printed.")):
    """Pick intervention strengths on the tuning split (seeds 500-999, canonical names; evaluation never uses them)."""
    from ..world import assets, bundle
    from ..world.tuning import (TuneOptionError, robust_steer_settings, steer_variant, tune_robust_params,
                                tune_saeuron_params, tune_steer_add_params, tune_steer_params)

    if kind not in bundle.KINDS:
        fail(f"--kind must be one of {', '.join(bundle.KINDS)}, not {kind!r}")
    if method not in ("saeuron", "steer", "steer-add", "robust-steer", "robust-saeuron"):
        fail(f"--method must be saeuron, steer, steer-add, robust-steer or robust-saeuron, not {method!r}")
    if method == "robust-saeuron" and kind == "colour":
        fail("--kind colour: SAeUron presets cover style and object (its dictionaries' benchmark kinds)")
    if method.startswith("robust") and concepts_per_kind < 1:
        fail(f"--concepts-per-kind must be >= 1, got {concepts_per_kind}")
    if out is not None:
        # checked before hours of tuning, not after
        target = out.resolve()
        if target.is_dir():
            fail(f"--out {out}: is a folder; give a JSON file path")
        if assets.ASSETS.resolve().parent in target.parents:
            fail(f"--out {out}: inside the installed package; write the preset elsewhere")
        if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            fail(f"--out {out}: folder {target.parent} does not exist or is not writable")
    params = bundle.load_params()
    if method in ("saeuron", "robust-saeuron"):
        if search not in ("grid", "halving"):
            fail(f"--search must be grid or halving, not {search!r}")
        sets = [tuple(x.strip() for x in bs.split("+") if x.strip()) for bs in blocks.split(";") if bs.strip()]
        unknown = [b for b in sorted({b for bs in sets for b in bs}) if b not in bundle.BLOCK_HOOKPOINTS]
        if unknown:
            fail(f"--blocks: no shipped SAE for {unknown[0]!r}; shipped: {', '.join(bundle.BLOCK_HOOKPOINTS)}")
        scs = [x.strip() for x in scalings.split(",") if x.strip()]
        if not scs or any(x not in ("mean", "latent") for x in scs):
            fail(f"--scalings must list 'mean' and/or 'latent', not {scalings!r}")
        sels = [x.strip() for x in selections.split(",") if x.strip()]
        if not sels or any(x not in ("paper", "specific") for x in sels):
            fail(f"--selections must list 'paper' and/or 'specific', not {selections!r}")
        wins = [None if w == "none" else parse_window(w, "--windows")
                for w in (x.strip() for x in windows.split(";")) if w]
        eds = [x.strip() for x in edits.split(";") if x.strip()]
        from ..interventions.ablate import EDITS

        if not eds or any(x not in EDITS for x in eds):
            fail(f"--edits must list some of {', '.join(repr(x) for x in EDITS)} (';' between them), not {edits!r}")
        grid = dict(top_n=[int(x) for x in parse_strengths(top_n, "--top-n")], gammas=parse_strengths(gammas, "--gammas"),
                    min_fires=[int(x) for x in parse_strengths(min_fires, "--min-fires")])
    elif method == "robust-steer":
        if match not in ("tokens", "embedding"):
            fail(f"--match must be tokens or embedding, not {match!r}")
        lams, imps = parse_strengths(strengths), parse_strengths(implicit, "--implicit")
        if any(x < 0 for x in imps):
            fail(f"--implicit fractions must be finite numbers >= 0, got {implicit!r}")
        starts = parse_from_steps(from_steps)
        dets = parse_detectors(detectors, bundle.PROBE_STEPS)
        try:
            robust_steer_settings(lams, imps, starts, dets, match)
        except TuneOptionError as e:
            fail(f"--detectors / --from-steps: {e}")
    elif method == "steer":
        lams = parse_strengths(strengths)
        try:
            orthogonal, contrast = steer_variant(params["steer"], kind, gated, orthogonal, contrast)
        except TuneOptionError as e:
            fail(str(e))
    else:
        lams = parse_strengths(strengths)
    pipe, clf = load_model(SHAPES), assets.load_classifier()
    with progress_bar() as p:
        task = p.add_task(f"tune {method} {kind}", total=None, info="images")
        prog = lambda n: p.advance(task, n)  # noqa: E731
        if method == "robust-steer":
            lines = tune_robust_params(pipe, clf, params, method, kind, concepts_per_kind=concepts_per_kind,
                                       strengths=lams, implicit=imps, match=match, from_steps=starts,
                                       detectors=dets, progress=prog)
        elif method == "robust-saeuron":
            lines = tune_robust_params(pipe, clf, params, method, kind, concepts_per_kind=concepts_per_kind,
                                       top_n=grid["top_n"], gammas=grid["gammas"], min_fires=grid["min_fires"],
                                       block_sets=sets, windows=wins or [None], per_concept=per_concept,
                                       edits=list(dict.fromkeys(eds)), progress=prog)
        elif method == "saeuron":
            lines = tune_saeuron_params(pipe, clf, params, kind, concepts=concept, search=search, images=images,
                                        scalings=scs, selections=sels, block_sets=sets, progress=prog, **grid)
        elif method == "steer":
            lines = tune_steer_params(pipe, clf, params, kind, lams, images=images, gated=gated, orthogonal=orthogonal,
                                      contrast=contrast, per_concept=per_concept, progress=prog)
        else:
            lines = tune_steer_add_params(pipe, clf, params, lams, progress=prog)
    for line in lines:
        typer.echo(line)
    if out is not None:
        bundle.save_params(params, out)
        typer.echo(f"saved {out}")
    else:
        typer.echo("not saved (give --out FILE.json to write these params as a preset)")


def parse_from_steps(text: str) -> list[int]:
    """--from-steps: comma-separated integers >= 0, in the order given, without repeats."""
    vals = []
    for x in (x.strip() for x in text.split(",")):
        if not x:
            continue
        try:
            v = int(x)
        except ValueError:
            fail(f"--from-steps must be comma-separated integers >= 0, got {text!r}")
        if v < 0:
            fail(f"--from-steps must be comma-separated integers >= 0, got {text!r}")
        vals.append(v)
    if not vals:
        fail(f"--from-steps: no step in {text!r}; give comma-separated integers such as 0,12")
    return list(dict.fromkeys(vals))


def parse_detectors(text: str, probe_steps) -> list:
    """--detectors: ';'-separated 'none' or 'STEP:THRESHOLD' -> None or (step, threshold), without repeats."""
    import math as _math

    out = []
    for x in (x.strip() for x in text.split(";")):
        if not x:
            continue
        if x.lower() == "none":
            out.append(None)
            continue
        parts = x.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            step, thr = int(parts[0]), float(parts[1])
        except ValueError:
            fail(f"--detectors must list 'none' or 'STEP:THRESHOLD' (';' between them, e.g. 'none;11:0.2'), got {x!r}")
        if step not in probe_steps:
            fail(f"--detectors {x}: STEP must be a shipped probe step ({', '.join(map(str, probe_steps))})")
        if not _math.isfinite(thr) or not 0 <= thr <= 1:
            fail(f"--detectors {x}: THRESHOLD must be a probability in [0, 1]")
        out.append((step, thr))
    if not out:
        fail(f"--detectors: nothing in {text!r}; give 'none' and/or 'STEP:THRESHOLD', e.g. 'none;11:0.2'")
    return list(dict.fromkeys(out))


def demo_cmd(out: Path = typer.Option(Path("demo"), help="Output folder."),
             seeds: int = typer.Option(2, help="Images per prompt group.")):
    """Both methods end to end on the bundled model: remove a style, unlearn an object, add a style."""
    import time as _time

    from ..eval.demo import run_demo

    t0 = _time.perf_counter()
    with progress_bar() as p:
        task = p.add_task("demo", total=None, info="images")
        res = run_demo(out, progress=lambda n: p.advance(task, n), seeds=seeds)
    r1, r2, r3 = res["remove_style"], res["unlearn_object"], res["add_style"]
    pct = lambda x: f"{100 * x:.0f} %"  # noqa: E731
    typer.echo(f"Concept Steerers removes '{r1['concept']}' (λ={r1['strength']:g}): present {pct(r1['present_before'])} -> "
               f"{pct(r1['present_after'])}; prompts without it keep {pct(r1['others_after'])} (was {pct(r1['others_before'])})")
    typer.echo(f"SAeUron unlearns '{r2['concept']}': present {pct(r2['present_before'])} -> {pct(r2['present_after'])}; "
               f"other objects keep {pct(r2['others_after'])} (was {pct(r2['others_before'])})")
    typer.echo(f"Concept Steerers adds '{r3['concept']}' (λ={r3['strength']:g}): present {pct(r3['present_before'])} -> "
               f"{pct(r3['present_after'])}")
    for m, rows in res.get("generalization", {}).get("rows", {}).items():
        for r in rows:
            typer.echo(f"  {m} on prompts that do not name '{r['concept']}': {r['kind']} left out "
                       f"{pct(r['implicit_plain'])} -> {pct(r['implicit'])}, empty prompt {pct(r['empty_plain'])} -> "
                       f"{pct(r['empty'])}, other concepts kept {pct(r['rest_accuracy'])}")
    typer.echo(f"{res['images_generated']} images in {_time.perf_counter() - t0:.0f} s")
    typer.echo(f"wrote {out}/before_after.png, {out}/strength_sweep.png, {out}/report.md")

