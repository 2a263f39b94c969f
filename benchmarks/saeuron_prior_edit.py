"""SAeUron on prompts that never ask for the concept: which blocks carry a concept the model's prior draws?

A shipped SAeUron preset edits the blocks where its concept's features fire on prompts that name it. On implicit
prompts (the attribute left out, and the empty prompt) the same concept can be drawn elsewhere: gradient's preset
at up_blocks.1.attentions.0 leaves its whole base rate there, whatever the edit. Two measurements, tuning split
(seeds 500-999, canonical names):

--screen: each edit ungated (every sample, from its window's first step) on `--images` implicit + as many empty
prompts: the concept's share of its plain base rate, the paired change (seeds whose plain image lacks the concept)
and the judge-space FD ratio on those seeds. An edit that cannot lower the base rate ungated cannot do it behind
any gate.

Without --screen: the shipped preset's main edit alone (the row "shipped": its "extra_edits" dropped, so the
presets as they were before second edits existed) beside the main edit plus one second edit, scored on every axis by
`robust_tune` (named, implicit, rest accuracy, paired change, TV, FD). The built-in candidates are gradient's: a second
edit at up_blocks.0 that reads the prompt's branch at step 0 with "below", so it acts only where the prompt does not
ask for the concept and leaves named prompts to the main edit (ungated, it lifts gradient's named presence from 9 % to
50-56 %). Each `--extra NAME=JSON` replaces them with a second edit of your own (blocks and firing count default to the
main edit's; a key "main" changes the main edit, e.g. its gate).

    python benchmarks/saeuron_prior_edit.py --screen [--kind style] [--concepts gradient,outlined] [--images 128] [--variants "a;b"]
    python benchmarks/saeuron_prior_edit.py [--kind style] [--concepts gradient] [--named 32] [--images 128] [--extra NAME=JSON ...]
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusion_sae.eval.metrics import paired_change_rate  # noqa: E402
from diffusion_sae.eval.shapes import ShapesBench, saeuron_context  # noqa: E402
from diffusion_sae.world import assets, bundle, robust_tune  # noqa: E402
from diffusion_sae.world.bundle import KINDS  # noqa: E402
from diffusion_sae.world.generalization import (GeneralizationConfig, _cat, empty_prompts, fd_ratio,  # noqa: E402
                                                implicit_prompts)

UP0 = ["unet.up_blocks.0.attentions.0", "unet.up_blocks.0.attentions.1"]
UP1 = ["unet.up_blocks.1.attentions.0", "unet.up_blocks.1.attentions.1"]
SPECIFIC = {"scaling": "latent", "selection": "specific", "window": [1, 25]}

# --screen: name -> changes to the shipped preset (its gates and rewind removed); None drops a key
SCREEN = {
    "style": {"shipped, ungated": {}, "γ 0": {"multiplier": 0.0}, "replace": {"edit": "replace"},
              "mean_patch": {"edit": "mean_patch"}, "top 16, γ 0": {"top_n": 16, "multiplier": 0.0},
              "up_blocks.1.attentions.1, γ −2": {"blocks": UP1[1:], "multiplier": -2.0},
              "both up_blocks.1, top 32, γ −2": {"blocks": UP1, "top_n": 32, "multiplier": -2.0},
              "up_blocks.0, top 32, γ −2": {"blocks": UP0, "top_n": 32, "multiplier": -2.0},
              "up_blocks.0, top 32, γ −4": {"blocks": UP0, "top_n": 32, "multiplier": -4.0},
              "up_blocks.0, top 8, γ −4": {"blocks": UP0, "top_n": 8, "multiplier": -4.0}},
    "object": {"shipped, ungated": {}, "γ 0": {"multiplier": 0.0}, "replace": {"edit": "replace"},
               "top 16, γ −4": {"top_n": 16, "multiplier": -4.0},
               "up_blocks.1, top 32, γ −2": {"blocks": UP1, "top_n": 32, "multiplier": -2.0}}}

# --candidates: name -> the extra edit (None: the shipped preset alone); min_fire 6 as gradient's main edit
CANDIDATES = {"shipped": None,
              **{f"+ up_blocks.0 top {n}, γ {g:g}, {mf} firing": {"blocks": UP0, "top_n": n, "multiplier": g, "min_fire": mf}
                 for n, g, mf in ((32, -2.0, 6), (32, -1.5, 6), (16, -2.0, 6), (32, -2.0, 3), (24, -2.0, 6))}}


def prior_edit(p: dict) -> dict:
    """An extra edit; by default for the samples whose prompt does not ask for the concept (step-0 prompt probe,
    p < 0.5). `p` may give its own "detector" (and "rewind")."""
    return {**SPECIFIC, "detector": [0, 0.5, "cond", "below"], **p}


def screen(pipe, clf, kind: str, concepts: list[str], n: int, names: list[str]) -> None:
    shipped, blocks = bundle.load_params()["saeuron"], bundle.load_blocks(kind)
    bench = ShapesBench(pipe, clf, batch_size=64)
    sets = [implicit_prompts(kind, n, "tuning"), empty_prompts(n, "tuning")]

    def judged(factory=None):
        js = [bench.run(ps, factory) for ps in sets]
        return {k: torch.cat([j.pred[k] for j in js]) for k in KINDS}, _cat(*js)

    plain, plain_judged = judged()
    print("| concept (plain base rate) | edit, ungated | implicit / base | paired change | FD ratio |")
    print("|---|---|---|---|---|")
    for c in concepts:
        ci = KINDS[kind].index(c)
        lacks = plain[kind] != ci
        base = float((plain[kind] == ci).float().mean())
        for name in names:
            change = SCREEN[kind][name]
            p = {k: v for k, v in shipped[c].items() if k not in ("detector", "rewind", "extra_edits")}
            p.update(change)
            out, j = judged(lambda: saeuron_context(pipe, blocks, {c: p}))
            pc = paired_change_rate({k: v.tolist() for k, v in plain.items()}, {k: v.tolist() for k, v in out.items()},
                                    lacks.tolist())
            print(f"| {c} ({100 * base:.0f} %) | {name} | {float((out[kind] == ci).float().mean()) / base:.2f} | "
                  f"{100 * pc:.0f} % | {fd_ratio(clf, plain_judged, j, lacks)[2]:.2f} |", flush=True)


def candidates(pipe, clf, kind: str, concepts: list[str], named: int, n: int, table: dict) -> None:
    shipped = bundle.load_params()["saeuron"]
    blocks = {kind: bundle.load_blocks(kind)}

    def cand(extra):
        def build(concept):
            p = {k: v for k, v in shipped[concept].items() if k != "extra_edits"}
            if extra is not None:   # blocks and min_fire default to the main edit's
                second = dict(extra)
                for k, v in second.pop("main", {}).items():    # changes to the main edit (null drops the key)
                    if v is None:
                        p.pop(k, None)
                    else:
                        p[k] = v
                p["extra_edits"] = [prior_edit({"blocks": p["blocks"], "min_fire": p.get("min_fire", 1), **second})]
            return lambda: saeuron_context(pipe, blocks[kind], {concept: p})
        return {kind: build}

    cfg = GeneralizationConfig(kinds=(kind,), only={kind: tuple(concepts)}, named=named, implicit=n, empty=n)
    res = robust_tune.tune(pipe, clf, {name: cand(e) for name, e in table.items()}, cfg, paired=True)
    print("| concept | preset | violation | named % | implicit / base | paired change | FD ratio | TV other | rest accuracy "
          "| damage (ties) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(concepts):
        for name, rows in res.rows.items():
            r = rows[i]
            print(f"| {c} | {name} | {robust_tune.violation(r, paired=True):.3f} | {100 * r['named']:.0f} | "
                  f"{robust_tune.axis_value(r, 'implicit_rel'):.2f} | {100 * r['paired_change']:.0f} % | {r['fd_ratio']:.2f} | "
                  f"{r['tv_other']:.2f} | {100 * r['rest_accuracy']:.0f} % | {robust_tune.damage(r):.3f} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--screen", action="store_true", help="ungated edits on implicit prompts only")
    ap.add_argument("--kind", default="style", choices=("style", "object"))
    ap.add_argument("--concepts", default="gradient")
    ap.add_argument("--images", type=int, default=128, help="implicit and empty prompts each")
    ap.add_argument("--named", type=int, default=32, help="named images per concept (--candidates)")
    ap.add_argument("--variants", default="", help="--screen: ';'-separated names of SCREEN's edits (default: all)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                    help="score this extra edit (JSON: the changes to a prior edit, e.g. '{\"blocks\": [...], "
                         "\"top_n\": 16, \"multiplier\": -4, \"detector\": [19, 0.2], \"rewind\": true}') beside "
                         "the shipped preset, instead of the built-in candidates; a key \"main\" holds changes to the "
                         "main edit (null drops a key); repeatable")
    a = ap.parse_args()
    table = CANDIDATES
    if a.extra:
        table = {"shipped": None}
        for item in a.extra:
            name, _, spec = item.partition("=")
            try:
                table[name] = json.loads(spec)
            except json.JSONDecodeError as e:
                ap.error(f"--extra {name}: not JSON ({e})")
            if not isinstance(table[name], dict):
                ap.error(f"--extra {name}: give a JSON object of preset keys")
    concepts = a.concepts.split(",")
    names = a.variants.split(";") if a.variants else list(SCREEN[a.kind])
    if any(n not in SCREEN[a.kind] for n in names):
        ap.error(f"--variants: give names among {'; '.join(SCREEN[a.kind])}")
    bad = [c for c in concepts if c not in KINDS[a.kind]]
    if bad:
        ap.error(f"--concepts: {bad[0]!r} is not a {a.kind} of ShapesCanvas")
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    if a.screen:
        screen(pipe, clf, a.kind, concepts, a.images, names)
    else:
        candidates(pipe, clf, a.kind, concepts, a.named, a.images, table)
    print(f"tuning split, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
