"""Rewind for SAeUron's objects on implicit prompts: read the image-side probe late, then redo a flagged sample with
the concept's edit from step 1 (built: `interventions/rewind.py`; measured here both ways).

A per-sample gate edits a sample only after its image-side probe has flagged it, and objects are decided early:
by step 9 the edit no longer turns many of them, while before it the probe knows little about where an unnamed
sample is heading (benchmarks/early_detection.py). Rewinding would decouple the two: detect at step k, then
denoise the flagged sample again from its first latent with the edit from step 1. The composite says what that
gives: per sample, the image of the preset with its gate removed (edit from step 1 on every sample) where the
preset's detectors flagged the sample, else the preset's own image; the built rewind (the preset with "rewind": true,
generated through `diffusion_sae.generate`) must agree with it, and its time over the preset's is its cost. Implicit (object left out)
and empty prompts of the tuning split; paired change counts the seeds whose plain image lacks the concept.

--kind style runs the same on styles (their implicit prompts leave the style out). The last column is the judge-space
FD ratio over the seeds whose plain image lacks the concept, as the generalization table computes it.

    python benchmarks/saeuron_rewind.py [--images 128] [--kind object|style] [--concepts circle,heart] [--probe-step 11]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusion_sae.eval.metrics import paired_change_rate  # noqa: E402
from diffusion_sae.eval.shapes import ShapesBench, saeuron_context  # noqa: E402
from diffusion_sae.interventions import ablate  # noqa: E402
from diffusion_sae.world import assets, bundle  # noqa: E402
from diffusion_sae.world.bundle import KINDS  # noqa: E402
from diffusion_sae.world.generalization import _cat, empty_prompts, fd_ratio, implicit_prompts  # noqa: E402

from saeuron_attack import with_image_probe  # noqa: E402
from saeuron_detector import split_detectors  # noqa: E402

VERDICTS: list[torch.Tensor] = []


def _recording(observe):
    # The gate's verdicts live inside the hooks; record each one as it is read (one per block hook and detector).
    def wrapped(self, i, h):
        out = observe(self, i, h)
        if self.tracker.step_index is not None and self.tracker.step_index == self.detectors[i].step:
            VERDICTS.append(self.flags[i].clone())
        return out
    return wrapped


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=128, help="implicit and empty prompts each")
    ap.add_argument("--kind", default="object", choices=("object", "style"))
    ap.add_argument("--concepts", default="circle,square,heart,cross,diamond")
    ap.add_argument("--probe-step", type=int, default=0, help="read the image-side probe here (0: the preset's)")
    a = ap.parse_args()
    ablate.SampleVerdicts.observe = _recording(ablate.SampleVerdicts.observe)
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    shipped, blocks = bundle.load_params()["saeuron"], bundle.load_blocks(a.kind)
    bench = ShapesBench(pipe, clf, batch_size=64)
    sets = [implicit_prompts(a.kind, a.images, "tuning"), empty_prompts(a.images, "tuning")]
    t0 = time.perf_counter()

    last: dict = {}

    def judged(factory=None):
        js = [bench.run(ps, factory) for ps in sets]
        last["judged"] = _cat(*js)     # for the FD ratio of the last call
        return {k: torch.cat([j.pred[k] for j in js]) for k in KINDS}

    plain = judged()
    plain_judged = last["judged"]
    print("| concept | probe step | base rate | preset: implicit / base | rewind: implicit / base | gate off: implicit / base "
          "| flagged | recall | paired change preset / rewind / gate off | built rewind: implicit / base, paired, "
          "verdicts unlike the composite | seconds: built rewind / preset | FD ratio: preset / built rewind |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in a.concepts.split(","):
        ci, p = KINDS[a.kind].index(c), with_image_probe(shipped[c], a.probe_step or None)
        p.pop("rewind", None)     # the preset without the rewind (a shipped "rewind": true is what is measured here)
        image = split_detectors(p["detector"])[1]
        VERDICTS.clear()
        t = time.perf_counter()
        gated = judged(lambda: saeuron_context(pipe, blocks, {c: p}))
        t_gated = time.perf_counter() - t
        gated_judged = last["judged"]
        per_call = len(p["detector"]) * len(p["blocks"])
        flags = torch.cat([torch.stack(VERDICTS[k:k + per_call]).any(0) for k in range(0, len(VERDICTS), per_call)])
        ungated = judged(lambda: saeuron_context(pipe, blocks, {c: {k: v for k, v in p.items() if k != "detector"}}))
        rewind = {k: torch.where(flags, ungated[k], gated[k]) for k in KINDS}
        # the built rewind (interventions/rewind.py, through ShapesBench's generate): should agree with the composite
        t = time.perf_counter()
        built = judged(lambda: saeuron_context(pipe, blocks, {c: dict(p, rewind=True)}))
        t_built = time.perf_counter() - t
        built_judged = last["judged"]
        unlike = int(torch.stack([built[k] != rewind[k] for k in KINDS]).any(0).sum())
        lacks = plain[a.kind] != ci

        def rate(x):
            return float((x[a.kind] == ci).float().mean())

        def paired(x):
            return paired_change_rate({k: v.tolist() for k, v in plain.items()}, {k: v.tolist() for k, v in x.items()},
                                      lacks.tolist())

        base = max(rate(plain), 1e-9)
        print(f"| {c} | {image[0][0]} | {100 * rate(plain):.0f} % | {rate(gated) / base:.2f} | {rate(rewind) / base:.2f} | "
              f"{rate(ungated) / base:.2f} | {100 * float(flags.float().mean()):.0f} % | {float(flags[~lacks].float().mean()):.2f} | "
              f"{100 * paired(gated):.0f} / {100 * paired(rewind):.0f} / {100 * paired(ungated):.0f} % | "
              f"{rate(built) / base:.2f}, {100 * paired(built):.0f} %, {unlike} of {len(lacks)} | "
              f"{t_built / t_gated:.2f}x | {fd_ratio(clf, plain_judged, gated_judged, lacks)[2]:.2f} / "
              f"{fd_ratio(clf, plain_judged, built_judged, lacks)[2]:.2f} |", flush=True)
    print(f"tuning split, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
