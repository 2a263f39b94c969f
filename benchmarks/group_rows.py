"""The generalization rows of the shipped methods removing the first 3 styles and 3 objects together (at once and one
after another), alone: what `diffusion-sae eval shapes --no-grid` computes for those rows, with the full run's settings
(evaluation split, 20 named / held-out-name / rest images per concept, 64 implicit + 64 empty-prompt images per kind),
without the other methods. A change that touches only the groups is measured in minutes instead of an hour; the rows
equal the full run's bit for bit (the CPU run is deterministic).

    python benchmarks/group_rows.py [--methods "Concept Steerers"] [--json rows.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_sae.world import assets, bundle  # noqa: E402
from diffusion_sae.world import generalization as gen  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="Concept Steerers,SAeUron", help="comma-separated method name prefixes")
    ap.add_argument("--json", default=None, help="also write the rows (run_generalization's result) to this file")
    a = ap.parse_args()
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    text_sae = bundle.load_text_sae()
    blocks = {k: bundle.load_blocks(k) for k in ("style", "object")}
    prefixes = tuple(a.methods.split(","))
    methods = {k: v for k, v in gen.group_methods(pipe, text_sae, blocks, bundle.load_params(), 3).items()
               if k.startswith(prefixes)}
    if not methods:
        ap.error(f"--methods {a.methods!r} matches none of the group methods")
    cfg = gen.eval_config()     # the full run's settings (`eval shapes` without --quick)
    t0 = time.perf_counter()
    g = gen.run_generalization(pipe, clf, methods, cfg)
    print(f"{g['images_generated']} images in {time.perf_counter() - t0:.0f} s (evaluation split)")
    hdr, rows = gen.table_rows(g)
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    for name, v in gen.mean_violations(g).items():
        print(f"{name}: mean bar violation {v:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(g, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
