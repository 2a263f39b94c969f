"""Benchmark: activation collection overhead and store read throughput (tiny SD 1.x pipeline, CPU).

Prints time(generation with capture to disk) / time(generation) — target <= 1.10x — measured in this
run with interleaved repeats (min of each), and the store's streaming read throughput in tokens/s.

    python benchmarks/collect.py [--prompts 4] [--steps 25] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diffusion_sae.activations import ActivationStore, Capture, PromptSet  # noqa: E402
from diffusion_sae.activations.collect import _header, CollectConfig  # noqa: E402
from diffusion_sae.models import resolve_hookpoint  # noqa: E402
from diffusion_sae.models.tiny import build_tiny_pipeline  # noqa: E402

HOOKPOINT = "unet.up_blocks.1.attentions.1"


def generate(pipe, prompts, steps, sink_store=None):
    """One pipeline call per prompt (batch 1, CFG on); with a store, capture both branches and commit to disk."""
    writer = sink_store.writer() if sink_store is not None else None
    t = time.perf_counter()
    cap = Capture(pipe, [HOOKPOINT], branches=("cond", "uncond"), to=writer, dtype=torch.float16) if writer else None
    if cap:
        cap.__enter__()
    try:
        for i, p in enumerate(prompts):
            if cap:
                cap.prompt_ids = [i]
            pipe(p, num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                 generator=torch.Generator().manual_seed(i))
            if writer:
                writer.mark_done([i])
        if writer:
            writer.commit()
    finally:
        if cap:
            cap.__exit__(None, None, None)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--read-tokens", type=int, default=1 << 18)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: tiny models gain nothing from more, and a shared CPU thrashes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = build_tiny_pipeline("sd")
    prompts = [f"a photo of a thing number {i}" for i in range(args.prompts)]
    ps = PromptSet.from_list(prompts)
    hp = resolve_hookpoint(pipe, HOOKPOINT)
    generate(pipe, prompts[:1], 2)  # warm-up
    base, capt = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved so that machine load affects both alike
            base.append(generate(pipe, prompts, args.steps))
            store = ActivationStore.create(f"{tmp}/run{r}", _header(CollectConfig([HOOKPOINT], steps=args.steps), hp, ps))
            capt.append(generate(pipe, prompts, args.steps, store))
        c = store.counts()
        print(f"tiny SD 1.x, {args.prompts} prompts x {args.steps} steps, CFG, hookpoint {HOOKPOINT} "
              f"({c['records']} records, {c['tokens']} tokens x {store.width}, fp16)")
        print(f"generation            : {min(base):.3f} s  (runs: {', '.join(f'{x:.3f}' for x in base)})")
        print(f"generation + capture  : {min(capt):.3f} s  (runs: {', '.join(f'{x:.3f}' for x in capt)})")
        print(f"overhead ratio        : {min(capt) / min(base):.3f}x  (target <= 1.10x)")

        # Read throughput on a synthetic store of SD-1.x-like width (768), 8 shards, fp16.
        d = 768
        big = ActivationStore.create(f"{tmp}/big", {"model": "synthetic", "hookpoint": "x", "width": d,
                                                    "dtype": "float16"})
        w = big.writer()
        per = args.read_tokens // 8
        from diffusion_sae.activations import CaptureBatch
        for s in range(8):
            x = torch.randn(per // 77, 77, d)
            w.add(CaptureBatch("x", x, torch.arange(len(x)) + s * 10_000, torch.zeros(len(x), dtype=torch.long),
                               -1, float("nan"), "cond", None))
            w.mark_done(range(s * 10_000, s * 10_000 + len(x)))
            w.commit()
        big.merge_parts()
        n_tok = big.num_tokens()
        t = time.perf_counter()
        seen = sum(len(b) for b in big.batches(4096, shuffle=True, seed=0, buffer_tokens=1 << 16))
        dt = time.perf_counter() - t
        assert seen == n_tok
        print(f"store read (shuffled) : {seen / dt:,.0f} tokens/s  ({seen} tokens x {d}, fp16 -> fp32, batch 4096, "
              f"buffer 65536 tokens, peak buffer {big.last_peak_buffer})")


if __name__ == "__main__":
    main()
