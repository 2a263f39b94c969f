"""SAeUron with an image-side per-sample gate: the concept's edits act only on the samples its kind's concept
probe flags (`ConceptEdit.detector`), after the probe's step.

SAeUron's shipped per-concept presets edit every sample where the concept's features fire; a feature firing
on another concept's patch changes seeds whose plain image never showed the concept (paired change up to
41 %). With the probe's verdict, a seed that is not heading to the concept is left exactly as the plain model
draws it, and a stronger edit can be afforded on the flagged ones. Scored like `tune --method
robust-saeuron` on the tuning split (seeds 500-999, canonical names), per concept (paired change counts):
each concept's best row is its shipped preset.

Round 2 adds a probe of the conditional (prompt) branch at step 0: what the prompt asks for (named,
paraphrased) is readable before the image has decided, so the edit can start at step 1 on those samples,
while the image-side probe still catches the samples of prompts that never ask for the concept.

    python benchmarks/saeuron_detector.py [--round 1|2|3|4|5|6|7|8|9|10|11] [--named 8] [--implicit 16] [--empty 16] [--concepts a,b] [--concepts-per-kind 0]
"""
from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_sae.eval.shapes import saeuron_context  # noqa: E402
from diffusion_sae.world import assets, bundle, robust_tune  # noqa: E402
from diffusion_sae.world.bundle import KINDS  # noqa: E402
from diffusion_sae.world.generalization import GeneralizationConfig  # noqa: E402


def variant(name: str, p: dict) -> dict:
    """The shipped preset p changed as the variant's name says."""
    q = dict(p)
    if name == "shipped":
        return q
    if name.startswith("prompt gate"):
        # round 2: the prompt's-branch probe at step 0 (p >= 0.5) OR the preset's own image-side probe
        # (probe 9 p >= 0.2 where the preset has none)
        cond, image = split_detectors(p.get("detector") or [9, 0.2])
        # a preset already behind the prompt gate keeps its detectors (rounds 5-6 strengthen those presets)
        cond, image = cond or [[0, 0.5, "cond"]], image or [[9, 0.2]]
        step = re.search(r"probe (\d+)", name)
        if step:
            image = [[int(step[1]), 0.2]]
        if "p0.8" in name:
            cond = [[d[0], 0.8, "cond"] for d in cond]
        q["detector"] = cond if "prompt gate only" in name else cond + image
        if "from step 1" in name:
            q["window"] = [1, 25]
        for g in (1.5, 2, 3):
            if f"γ×{g:g}" in name:
                q["multiplier"] = p.get("multiplier", -1.0) * g
        if "mean_patch" in name:
            q["edit"] = "mean_patch"
        for g in (2, 4):
            if f"top_n×{g}" in name:
                q["top_n"] = g * p.get("top_n", 1)
        if "min_fire 1" in name:
            q["min_fire"] = 1
        if "rewind" in name:
            q["rewind"] = True
        if "min_fire÷2" in name:
            q["min_fire"] = max(1, p.get("min_fire", 1) // 2)
        if "+block" in name and EXTRA_BLOCK[kind_of(p)] not in p["blocks"]:
            q["blocks"] = [*p["blocks"], EXTRA_BLOCK[kind_of(p)]]
        if "window 1" in name:
            q["window"] = [1, 25]
        if "all blocks" in name:
            q["blocks"] = list(ALL_BLOCKS[kind_of(p)])
        floor = re.search(r"top_n≥(\d+)", name)
        if floor:
            q["top_n"] = max(int(floor[1]), q.get("top_n", 1))
        return q
    gamma, step, tau = {"probe 9 p≥0.2": (1, 9, 0.2), "probe 5 p≥0.2": (1, 5, 0.2),
                        "probe 5 p≥0.2, γ×2": (2, 5, 0.2), "probe 5 p≥0.2, γ×2, every step": (2, 5, 0.2)}[name]
    q["multiplier"] = p.get("multiplier", -1.0) * gamma
    q["detector"] = [step, tau]
    if name.endswith("every step"):
        q.pop("window", None)
    return q


# round 3: a further block of the same kind's SAEs, one the preset does not use
EXTRA_BLOCK = {"style": "unet.up_blocks.1.attentions.1", "object": "unet.up_blocks.0.attentions.0"}


# round 7: every shipped block SAE outside up_blocks.1 (whose blocks carry style, not shape)
ALL_BLOCKS = {"object": ("unet.down_blocks.2.attentions.0", "unet.mid_block.attentions.0",
                         "unet.up_blocks.0.attentions.0", "unet.up_blocks.0.attentions.1")}


def split_detectors(spec) -> tuple[list, list]:
    """A preset's "detector" (one [step, threshold(, branch)] or a list of them) as (prompt's-branch gates,
    image-side probes), each a list of lists."""
    dets = [list(d) for d in spec] if isinstance(spec[0], list) else [list(spec)]
    return [d for d in dets if d[2:] == ["cond"]], [d for d in dets if d[2:] != ["cond"]]


def kind_of(p: dict) -> str:
    return "style" if "unet.up_blocks.1.attentions.0" in p["blocks"] else "object"


VARIANTS = {1: ("shipped", "probe 9 p≥0.2", "probe 5 p≥0.2", "probe 5 p≥0.2, γ×2", "probe 5 p≥0.2, γ×2, every step"),
            2: ("shipped", "prompt gate", "prompt gate, from step 1", "prompt gate, from step 1, γ×2",
                "prompt gate, from step 1, mean_patch"),
            3: ("prompt gate, from step 1, γ×2, +block", "prompt gate, from step 1, γ×3",
                "prompt gate, from step 1, γ×2, top_n×2", "prompt gate, from step 1, γ×2, min_fire÷2",
                "prompt gate, probe 5, from step 1, γ×2"),
            # round 4: the prompt gate alone (no image-side probe: the edits leave unnamed prompts alone)
            # with the strongest edits, for the concepts rounds 2-3 could not remove on named prompts
            4: ("prompt gate only, from step 1, γ×2, top_n×2", "prompt gate only, from step 1, γ×2, top_n×4",
                "prompt gate only, from step 1, γ×3, top_n×4, min_fire 1", "prompt gate only, from step 1, γ×2, top_n×2, +block"),
            # round 5: the objects' presets (already behind the prompt gate) strengthened further, judged with
            # --named 32: the eval split showed 12-38 % on named prompts where 8 named tuning images showed 0-12 %
            5: ("shipped", "prompt gate, window 1, γ×1.5", "prompt gate, window 1, top_n×4",
                "prompt gate, window 1, +block", "prompt gate, window 1, γ×1.5, top_n×2, +block",
                "prompt gate, window 1, γ×2, top_n×4, min_fire 1, +block"),
            # round 6: the styles, judged with --named 32 --implicit 64 --empty 64 (16 + 16 implicit images put a
            # concept's base rate at 2-4 images, too few to rank settings on the implicit axis): an earlier
            # image-side probe, the stricter prompt gate, and the prompt gate for dotted (image-side probe alone)
            6: ("shipped", "prompt gate, window 1", "prompt gate, probe 5, window 1", "prompt gate, probe 5, window 1, γ×1.5",
                "prompt gate p0.8, probe 7, window 1, γ×1.5", "prompt gate p0.8, probe 5, window 1, γ×1.5, top_n×2"),
            # round 7: the objects judged with --named 128 (the evaluation split's 8 named images showed 3/8 for
            # triangle, cross and diamond; 64-128 images at other seeds put their rates at 2-15 %, and stronger
            # edits on the preset's own blocks did not lower them): the edit spread over all four object blocks,
            # with at least 64 or 128 features
            7: ("shipped", "prompt gate, window 1, all blocks, top_n≥64", "prompt gate, window 1, all blocks, top_n≥128",
                "prompt gate, window 1, all blocks, top_n≥64, γ×1.5", "prompt gate, window 1, all blocks, top_n≥64, min_fire÷2"),
            # round 8 (star, which no round-7 setting beat: the image-side probe spread its stronger edits over
            # implicit samples, paired change 24-29 %): the same edits behind the prompt gate alone
            8: ("shipped", "prompt gate only, window 1, all blocks, top_n≥64", "prompt gate only, window 1, all blocks, top_n≥64, min_fire÷2",
                "prompt gate only, window 1, +block, top_n≥64, min_fire÷2"),
            # round 9 (star): the stricter prompt gate (p >= 0.8) alone, so fewer implicit samples get the spread edit
            9: ("shipped", "prompt gate only p0.8, window 1, all blocks, top_n≥64",
                "prompt gate only p0.8, window 1, all blocks, top_n≥64, min_fire÷2", "prompt gate p0.8, window 1, all blocks, top_n≥64"),
            # round 10 (objects and styles, judged with --implicit 128 --empty 128): the image-side probe read at step 11
            # instead of 5-9. A flagged sample is edited only after the probe's step, but at step 11 the probe flags far
            # more of the unnamed samples heading to the concept (circle: 40 % at step 5, 79 % at step 11; saeuron_rewind.py)
            10: ("shipped", "prompt gate, probe 11"),
            # round 11 (star, gradient, outlined: the presets with no image-side probe, implicit ratio 1.00 / 0.70 in the
            # acceptance run): the step-11 probe with the rewind, which redoes a flagged sample with the edit from the
            # preset's first step, judged on every axis (rest accuracy included, which saeuron_rewind.py does not measure)
            11: ("shipped", "prompt gate, probe 11", "prompt gate, probe 11, rewind")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts-per-kind", type=int, default=0)
    ap.add_argument("--round", type=int, choices=sorted(VARIANTS), default=1,
                    help="1: the image-side probe alone; 2: OR the prompt's-branch probe at step 0; 3: stronger edits "
                         "behind that gate; 4: the prompt gate alone with the strongest edits; 5-6: "
                         "objects and styles on more images; 7: objects' edits on all four object blocks; 8: those "
                         "behind the prompt gate alone; 9: behind the stricter one; 10: the image-side probe at step 11; 11: that probe with the rewind")
    ap.add_argument("--named", type=int, default=8, help="images per concept on named prompts")
    ap.add_argument("--implicit", type=int, default=16, help="images per kind on attribute-left-out prompts")
    ap.add_argument("--empty", type=int, default=16, help="images of the empty prompt")
    ap.add_argument("--concepts", default="", help="comma-separated concepts (default: every style and object)")
    a = ap.parse_args()
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    shipped = bundle.load_params()["saeuron"]
    blocks = {k: bundle.load_blocks(k) for k in ("style", "object")}

    def candidate(v):
        def for_kind(kind):
            def build(concept):
                return lambda: saeuron_context(pipe, blocks[kind], {concept: variant(v, shipped[concept])})
            return build
        return {k: for_kind(k) for k in blocks}

    cands = {f"SAeUron shipped preset, {v}" if v != "shipped" else "SAeUron shipped preset": candidate(v) for v in VARIANTS[a.round]}
    t0 = time.perf_counter()
    only = None
    if a.concepts:
        wanted = a.concepts.split(",")
        only = {k: tuple(c for c in KINDS[k] if c in wanted) for k in ("style", "object")}
    cfg = GeneralizationConfig(concepts_per_kind=a.concepts_per_kind or None, kinds=("style", "object"), only=only, named=a.named,
                               implicit=a.implicit, empty=a.empty)
    res = robust_tune.tune(pipe, clf, cands, cfg, paired=True)
    print(f"tuning split, {time.perf_counter() - t0:.0f} s")
    print("| concept | setting | violation | named % | implicit / base | paired change | FD ratio | rest accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    concepts = [r["concept"] for r in res.rows[next(iter(res.rows))]]
    for i, c in enumerate(concepts):
        best = None
        for name, rows in res.rows.items():
            r = rows[i]
            v = robust_tune.violation(r, paired=True)
            print(f"| {c} | {name} | {v:.2f} | {100 * r['named']:.0f} | {robust_tune.axis_value(r, 'implicit_rel'):.2f} | "
                  f"{100 * r['paired_change']:.0f} % | {r['fd_ratio']:.2f} | {100 * r['rest_accuracy']:.0f} % |", flush=True)
            best = (v, name) if best is None or v < best[0] else best
        print(f"| {c} | **best: {best[1]}** | {best[0]:.2f} | | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
