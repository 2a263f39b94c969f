"""Concept Steerers on prompts that name no concept of the kind: the implicit fraction by the step it starts.

The shipped FamilyGate adds 0.1 of the removal S to prompts that name none of the concept's family, at
every denoising step. A text edit moves the whole trajectory, so removing more there costs the rest of
the image. This experiment keeps named and rival prompts as shipped and lets the implicit fraction act
only from step k of 25 (`FamilyGate(..., implicit_from_step=k)`, params key "family_from_step"): before
it the UNet receives the encoding with the implicit fraction at 0. Scored like `tune --method
robust-steer` on the tuning split (seeds 500-999, canonical names, the first 3 concepts of each kind):
mean violation of the erasure bars, damage, implicit presence / base rate, paired change, TV, FD ratio.

    python benchmarks/implicit_schedule.py [--concepts-per-kind 3]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_sae.eval.shapes import family_removal, steer_strength  # noqa: E402
from diffusion_sae.interventions.steer import steer_text_encoder  # noqa: E402
from diffusion_sae.world import assets, bundle, robust_tune  # noqa: E402
from diffusion_sae.world.generalization import GeneralizationConfig  # noqa: E402

# (implicit fraction, first step)
SETTINGS = ((0.1, 0), (0.2, 8), (0.2, 6), (0.2, 10), (0.3, 8), (0.15, 8))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts-per-kind", type=int, default=3)
    a = ap.parse_args()
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    text_sae, params = bundle.load_text_sae(), bundle.load_params()

    def candidate(fraction, start):
        def for_kind(kind):
            def build(concept):
                st = family_removal(text_sae, pipe, kind, concept, steer_strength(params["steer"], kind, concept),
                                    fraction, None, "embedding", implicit_from_step=start)
                return lambda: steer_text_encoder(pipe, st)
            return build
        return {k: for_kind(k) for k in bundle.KINDS}

    cands = {f"implicit x{f:g} from step {s}": candidate(f, s) for f, s in SETTINGS}
    t0 = time.perf_counter()
    res = robust_tune.tune(pipe, clf, cands, GeneralizationConfig(concepts_per_kind=a.concepts_per_kind), paired=False)
    print(f"tuning split, {a.concepts_per_kind} concepts per kind, {time.perf_counter() - t0:.0f} s")
    print("| setting | mean violation | mean damage | implicit / base | paired change | TV other (max) | FD ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, v, d in res.table():
        rows = res.rows[name]
        mean = lambda key: sum(robust_tune.axis_value(r, key) or 0.0 for r in rows) / len(rows)  # noqa: E731
        print(f"| {name} | {v:.2f} | {d:.2f} | {mean('implicit_rel'):.2f} | {100 * mean('paired_change'):.0f} % | "
              f"{max(r['tv_other'] for r in rows):.2f} | {mean('fd_ratio'):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
