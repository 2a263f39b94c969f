"""How early does the denoiser know which style or object a sample is heading to when the prompt never says?

An erasure gated per sample (SAeUron's `ConceptEdit.detector`, Concept Steerers' `FamilyGate`) can only act on
implicit prompts (the attribute left out, the empty prompt) from the step after its image-side probe has read
the concept; an edit that starts too late no longer turns the sample. This measures the best such a probe can
do at each step: it is fitted on the *outcome* (the judge's verdict on each sample's finished plain image, not
the prompt's name) of half the samples and scored on the other half. The shipped probes (fitted on named
prompts) are scored on the same held-out half. Everything is on the tuning split (seeds 500-999).

    python benchmarks/early_detection.py [--kind object] [--implicit 320] [--empty 160] [--threshold 0.2]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusion_sae.concepts.probe import fit_probe_on_activations, pooling  # noqa: E402
from diffusion_sae.eval.shapes import ShapesBench  # noqa: E402
from diffusion_sae.models import resolve_hookpoint  # noqa: E402
from diffusion_sae.world import assets, bundle  # noqa: E402
from diffusion_sae.world.generalization import empty_prompts, implicit_prompts  # noqa: E402

STEPS = (1, 2, 3, 4, 5, 7, 9)


def capture(pipe, hookpoint: str, got: dict):
    """A context-manager factory for ShapesBench.run: the block's patch-mean on the unconditional branch at
    each step of `got`, one row per sample, appended in generation order."""
    hp = resolve_hookpoint(pipe, hookpoint)
    return lambda: pooling(pipe, hp, got)


def scores(p: torch.Tensor, y: torch.Tensor, threshold: float) -> tuple[float, float, float, float]:
    """accuracy, mean and worst recall of `p[:, c] >= threshold` over concepts present, mean false alarms."""
    acc = float((p.argmax(-1) == y).float().mean())
    rec, fa = [], []
    for c in range(p.shape[1]):
        flag, pos = p[:, c] >= threshold, y == c
        if pos.any():
            rec.append(float(flag[pos].float().mean()))
        fa.append(float(flag[~pos].float().mean()))
    return acc, sum(rec) / len(rec), min(rec), sum(fa) / len(fa)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=("style", "object", "colour"), default="object")
    ap.add_argument("--implicit", type=int, default=320)
    ap.add_argument("--empty", type=int, default=160)
    ap.add_argument("--threshold", type=float, default=0.2)
    a = ap.parse_args()
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    hookpoint, concepts = bundle.PROBE_HOOKPOINTS[a.kind], list(bundle.KINDS[a.kind])
    got = {s: [] for s in STEPS}
    bench = ShapesBench(pipe, clf)
    t0 = time.perf_counter()
    judged = [bench.run(implicit_prompts(a.kind, a.implicit, "tuning"), capture(pipe, hookpoint, got)),
              bench.run(empty_prompts(a.empty, "tuning"), capture(pipe, hookpoint, got))]
    y = torch.cat([j.pred[a.kind] for j in judged])
    x = {s: torch.cat(rows) for s, rows in got.items()}
    half = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    fit, test = half[: len(y) // 2], half[len(y) // 2:]
    print(f"{a.kind}: {len(y)} implicit + empty samples on the tuning split, {time.perf_counter() - t0:.0f} s; "
          f"outcomes {dict(zip(concepts, torch.bincount(y, minlength=len(concepts)).tolist()))}")
    print(f"\n| probe | step | accuracy (chance {1 / len(concepts):.2f}) | mean recall p≥{a.threshold:g} | worst recall | "
          "mean false alarms |")
    print("|---|---|---|---|---|---|")
    for s in STEPS:
        probe = fit_probe_on_activations(hookpoint, s, concepts, x[s][fit], y[fit])
        r = scores(probe.probabilities(x[s][test]), y[test], a.threshold)
        print(f"| fitted on outcomes | {s} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} |")
    for s in bundle.PROBE_STEPS:
        if s in x:
            r = scores(bundle.load_probe(a.kind, s).probabilities(x[s][test]), y[test], a.threshold)
            print(f"| shipped (named prompts) | {s} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
