"""Some generalization rows of `diffusion-sae eval shapes --no-grid`, alone: the methods whose names start with
`--methods` (the shipped ones, the papers' settings, and both shipped methods removing the first 3 styles and 3
objects together), for every concept or only `--concepts`, with the full run's settings (evaluation split, 20 named /
held-out-name / rest images per concept, 64 implicit + 64 empty-prompt images per kind). A change that touches one
preset is measured in minutes instead of an hour. A concept's row depends only on its own preset, and the CPU run is
deterministic: rerun with the full run's presets, a row's judged labels equal the full run's (checked for SAeUron's
gradient: every figure but FD(plain, rendered), the FD ratio's denominator, which agrees to 5 parts in a million).

`--splice DIR` replaces those rows in DIR/results.json (a full run's report folder) and rewrites its report, which
then says which rows came from which rerun. A row whose concept was attacked in the full run is refused: the
attack is not rerun here, so its adversarial figure would belong to the old preset.

    python benchmarks/method_rows.py [--methods "SAeUron (shipped)"] [--concepts gradient] [--json rows.json]
                                     [--splice docs/eval-generalization-full --why "..."]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_sae.world import assets, bundle  # noqa: E402
from diffusion_sae.world import generalization as gen  # noqa: E402
from diffusion_sae.world.bundle import KINDS  # noqa: E402


def splice(folder: Path, new: dict, why: str) -> list[str]:
    """Replace `new`'s rows (same method, same concept) in folder/results.json; rewrite the report there."""
    from diffusion_sae.eval.report import write_report

    res = json.loads((folder / "results.json").read_text())
    g = res["generalization"]
    done = []
    for method, rows in new["rows"].items():
        old = g["rows"].get(method)
        if old is None:
            raise SystemExit(f"error: {folder}/results.json has no rows of {method!r}; run the full benchmark")
        for r in rows:
            i = next((i for i, o in enumerate(old) if o["concept"] == r["concept"]), None)
            if i is None:
                raise SystemExit(f"error: {folder}/results.json has no {method!r} row of {r['concept']!r}")
            if "adversarial" in old[i]:
                raise SystemExit(f"error: {method!r} {r['concept']!r} was attacked in the full run; rerun the full "
                                 "benchmark (diffusion-sae eval shapes), which reruns the attack too")
            old[i] = r
            done.append(f"{method}: {r['concept']}")
        g["summary"][method] = gen.summarize(old)
    report = json.loads((folder / "report.json").read_text())
    settings = dict(report["settings"])
    settings["spliced"] = "; ".join(filter(None, [settings.get("spliced", ""),
                                                  f"{', '.join(done)} from a rerun of those rows alone (same settings, "
                                                  f"seeds and prompts): {why}"]))
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    write_report(folder, report["title"], [gen.report_section(g)], settings)
    os.replace(tmp, folder / "results.json")
    return done


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="Concept Steerers (shipped, 3,SAeUron (shipped, 3",
                    help="comma-separated method name prefixes (default: the group rows)")
    ap.add_argument("--concepts", default="", help="comma-separated concepts (default: every concept the methods score)")
    ap.add_argument("--json", default=None, help="also write the rows (run_generalization's result) to this file")
    ap.add_argument("--splice", type=Path, default=None, help="a full run's report folder whose rows these replace")
    ap.add_argument("--why", default="", help="with --splice: what changed, for the report's settings")
    a = ap.parse_args()
    if a.splice is not None and not (a.splice / "results.json").is_file():
        ap.error(f"--splice {a.splice}: no results.json there; give a folder written by diffusion-sae eval shapes")
    only = None
    if a.concepts:
        wanted = a.concepts.split(",")
        unknown = [c for c in wanted if not any(c in cs for cs in KINDS.values())]
        if unknown:
            ap.error(f"--concepts: {unknown[0]!r} is not a ShapesCanvas concept")
        only = {k: tuple(c for c in cs if c in wanted) for k, cs in KINDS.items()}
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    text_sae = bundle.load_text_sae()
    blocks = {k: bundle.load_blocks(k) for k in ("style", "object")}
    prefixes = tuple(a.methods.split(","))
    methods = {k: v for k, v in gen.default_methods(pipe, text_sae, blocks, bundle.load_params(), 3).items()
               if k.startswith(prefixes)}
    if not methods:
        ap.error(f"--methods {a.methods!r} matches none of the benchmark's methods")
    cfg = gen.eval_config()     # the full run's settings (`eval shapes` without --quick)
    if only is not None:
        kinds = tuple(k for k in cfg.kinds if only.get(k))
        cfg = dataclasses.replace(cfg, kinds=kinds, only={k: only[k] for k in kinds})
    t0 = time.perf_counter()
    g = gen.run_generalization(pipe, clf, methods, cfg)
    print(f"{g['images_generated']} images in {time.perf_counter() - t0:.0f} s (evaluation split)")
    hdr, rows = gen.table_rows(g)
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(g, f, indent=1)
    if a.splice is not None:
        done = splice(a.splice, {"rows": {m: r for m, r in g["rows"].items() if r}}, a.why)
        print(f"spliced into {a.splice}: {'; '.join(done)}", file=sys.stderr)
        res = json.loads((a.splice / "results.json").read_text())
        for name, v in gen.mean_violations(res["generalization"]).items():
            print(f"{name}: mean bar violation {v:.4f}")
    else:
        for name, v in gen.mean_violations(g).items():
            print(f"{name}: mean bar violation {v:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
