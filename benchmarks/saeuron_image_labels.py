"""SAeUron's concept dictionary labelled by what the image shows instead of what the prompt names.

The shipped dictionaries (concepts/dictionary.py, as in the SAeUron paper) average a block's SAE latents over
prompts that NAME each concept. On implicit prompts (the attribute left out) and the empty prompt the concept
arrives without the word, and for gradient, outlined, star and diamond the shipped edits leave it there even
when every sample heading to it is redone with the edit (saeuron_rewind.py: gradient 0.80 of its base rate at
recall 1.00). Are the features picked from named prompts the wrong ones? This builds the same dictionary
(means, and the per-patch tables of "specific" selection) with every sample assigned to the concept the judge
reads in its final image: implicit and empty prompts at tuning seeds 700-999 plus 16 named prompts per concept
(offsets 32-47 of their tuning sets). It then measures the shipped preset and its probe-19 rewind with either
dictionary on implicit + empty prompts at tuning seeds 500-627 and on the first 32 named tuning prompts, which
the build never saw.

    python benchmarks/saeuron_image_labels.py --kind style --concepts gradient,outlined [--build 256]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusion_sae.concepts.dictionary import build_concept_dictionary  # noqa: E402
from diffusion_sae.eval.metrics import paired_change_rate  # noqa: E402
from diffusion_sae.eval.shapes import ShapesBench, saeuron_context  # noqa: E402
from diffusion_sae.world import assets, bundle  # noqa: E402
from diffusion_sae.world.bundle import KINDS  # noqa: E402
from diffusion_sae.world.config import GUIDANCE  # noqa: E402
from diffusion_sae.world.generalization import _cat, empty_prompts, fd_ratio, implicit_prompts, named_prompts  # noqa: E402

from saeuron_attack import with_image_probe  # noqa: E402

STEPS = 25


def subset(ps, a: int, b: int):
    return type(ps)(*(getattr(ps, f)[a:b] for f in ps.__dataclass_fields__))


def judge_labelled_dictionary(pipe, clf, kind: str, hookpoint: str, sae, build_sets) -> tuple:
    """The block's concept dictionary with each sample under the concept the judge reads in its image
    (build_concept_dictionary's labeller), and the number of samples per judged concept."""
    names = list(KINDS[kind])
    groups = {f"set {i}": ps for i, ps in enumerate(build_sets)}

    def judge(images):
        return [names[i] for i in clf.predict(images)[kind].tolist()]

    d = build_concept_dictionary(pipe, sae, hookpoint, {g: list(ps.prompts) for g, ps in groups.items()},
                                 seeds={g: [int(s) for s in ps.seeds] for g, ps in groups.items()}, steps=STEPS,
                                 guidance=GUIDANCE, batch_size=64, labeller=judge, labels=names)
    return d, torch.tensor(d.counts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="style", choices=("style", "object"))
    ap.add_argument("--concepts", default="gradient,outlined")
    ap.add_argument("--build", type=int, default=256, help="implicit and empty prompts each in the build")
    a = ap.parse_args()
    kind, concepts = a.kind, a.concepts.split(",")
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    shipped, blocks = bundle.load_params()["saeuron"], bundle.load_blocks(a.kind)
    names = list(KINDS[kind])
    t0 = time.perf_counter()
    imp = subset(implicit_prompts(kind, 500, "tuning"), 200, 200 + a.build)    # tuning seeds 700-999
    emp = subset(empty_prompts(500, "tuning"), 200, 200 + a.build)
    measured_seeds = set(range(500, 628))
    assert not set(imp.seeds + emp.seeds) & measured_seeds, "build seeds overlap the measured ones"
    build = [imp, emp] + [subset(named_prompts(kind, c, 48, split="tuning"), 32, 48) for c in names]
    labelled = dict(blocks)
    for h, (sae, d) in blocks.items():
        if any(h in shipped[c]["blocks"] for c in concepts):
            nd, counts = judge_labelled_dictionary(pipe, clf, kind, h, sae, build)
            labelled[h] = (sae, nd)
            print(f"{h}: samples per judged label {dict(zip(names, counts.int().tolist()))}", flush=True)
    bench = ShapesBench(pipe, clf, batch_size=64)
    sets = [implicit_prompts(kind, 128, "tuning"), empty_prompts(128, "tuning")]
    last = {}

    def judged(factory=None):
        js = [bench.run(ps, factory) for ps in sets]
        last["judged"] = _cat(*js)
        return {k: torch.cat([j.pred[k] for j in js]) for k in KINDS}

    plain = judged()
    plain_judged = last["judged"]
    print("| concept | dictionary | preset | named % | implicit / base | paired change | FD ratio |")
    print("|---|---|---|---|---|---|---|")
    for c in concepts:
        ci = names.index(c)
        lacks = plain[kind] != ci
        base = max(float((plain[kind] == ci).float().mean()), 1e-9)
        for dname, bl in (("prompt-labelled (shipped)", blocks), ("judge-labelled", labelled)):
            for pname, p in (("shipped", dict(shipped[c])), ("probe 19 + rewind", with_image_probe(shipped[c], 19, 1.0, True))):
                r = judged(lambda: saeuron_context(pipe, bl, {c: p}))
                edited = last["judged"]
                named = bench.run(named_prompts(kind, c, 32, split="tuning"), lambda: saeuron_context(pipe, bl, {c: p}))
                pc = paired_change_rate({k: v.tolist() for k, v in plain.items()}, {k: v.tolist() for k, v in r.items()},
                                        lacks.tolist())
                print(f"| {c} | {dname} | {pname} | {100 * float((named.pred[kind] == ci).float().mean()):.0f} | "
                      f"{float((r[kind] == ci).float().mean()) / base:.2f} | {100 * pc:.0f} % | "
                      f"{fd_ratio(clf, plain_judged, edited, lacks)[2]:.2f} |", flush=True)
    print(f"tuning split, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
