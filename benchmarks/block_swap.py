"""Which cross-attention blocks carry a style? A causal swap test on the bundled ShapesCanvas pipeline.

For 40 prompts, the text condition of the chosen blocks' cross-attention (`attn2`, conditional half
of classifier-free guidance) is replaced by the encoding of the same prompt with another style; the
share of images the judge then labels with the swapped-in style tells how much of the style those
blocks decide. Motivates SAeUron on several blocks (diffusion_sae/world/README.md).

    python benchmarks/block_swap.py            # swap the style
    python benchmarks/block_swap.py object     # swap the object instead
"""
import sys

import torch

from diffusion_sae.world.assets import load_classifier, load_pipeline
from diffusion_sae.world.config import COLOUR_NAMES, GUIDANCE, OBJECTS, STYLES, eval_prompt


def main(kind: str = "style") -> None:
    if kind not in ("style", "object"):
        raise SystemExit(f"block_swap.py: kind must be 'style' or 'object', not {kind!r}")
    other_kind = "object" if kind == "style" else "style"
    pipe, clf = load_pipeline(), load_classifier()
    pipe.set_progress_bar_config(disable=True)
    modules = dict(pipe.unet.named_modules())
    blocks = [n for n in modules if n.endswith("attn2")]
    prompts, swapped, target, objects = [], [], [], []
    for i in range(40):
        o, s, c = i % 10, (i * 3) % 8, i % 6
        s2 = (s + 1 + i % 7) % 8
        o2 = (o + 1 + i % 9) % 10
        prompts.append(eval_prompt(OBJECTS[o], STYLES[s], COLOUR_NAMES[c]))
        if kind == "style":
            swapped.append(eval_prompt(OBJECTS[o], STYLES[s2], COLOUR_NAMES[c]))
            target.append(s2)
            objects.append(o)
        else:
            swapped.append(eval_prompt(OBJECTS[o2], STYLES[s], COLOUR_NAMES[c]))
            target.append(o2)
            objects.append(s)     # the attribute that must stay: here the style
    with torch.no_grad():
        other, _ = pipe.encode_prompt(swapped, "cpu", 1, False)
    active: set[str] = set()

    def make(name):
        def pre(mod, args, kwargs):
            if name not in active:
                return None
            ehs = kwargs["encoder_hidden_states"].clone()
            ehs[ehs.shape[0] // 2:] = other          # the conditional half
            return args, dict(kwargs, encoder_hidden_states=ehs)
        return pre

    handles = [modules[n].register_forward_pre_hook(make(n), with_kwargs=True) for n in blocks]
    try:
        def run(names):
            active.clear()
            active.update(names)
            gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            with torch.no_grad():
                img = pipe(prompts, num_inference_steps=25, guidance_scale=GUIDANCE, generator=gens, output_type="pt").images
            pred = clf.predict(img)
            moved = (pred[kind] == torch.tensor(target)).float().mean().item()
            kept = (pred[other_kind] == torch.tensor(objects)).float().mean().item()
            print(f"{label(names):55s} {kind} moved {100 * moved:5.1f} %   {other_kind} kept {100 * kept:5.1f} %",
                  flush=True)

        def label(names):
            return "none" if not names else "all" if len(names) == len(blocks) else \
                " + ".join(n.removesuffix(".transformer_blocks.0.attn2") for n in names)

        run([])
        for b in blocks:
            run([b])
        run([b for b in blocks if b.startswith("up_blocks.1")])
        run(blocks)
    finally:
        for h in handles:
            h.remove()


if __name__ == "__main__":
    main(*sys.argv[1:2])
