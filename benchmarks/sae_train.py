"""SAE training throughput and quality: ours vs SAELens (TopK) and EleutherAI sparsify, same activations.

d_in = 768, L = 3072 and 12288, k = 32, batch 4096, fp32 Adam, synthetic sparse activations (768-d,
4L/... atoms, 32 active). For every implementation: tokens/s over timed steps (after warm-up) and the
FVU on held-out tokens after the same number of training tokens. Ours is also reported as a fraction
of the bound set by the encoder matrix product alone (x @ W_encᵀ + b, timed in the same run).

Peers are imported from the running interpreter: run this file with a bench venv's python that has
`sae-lens` / `eai-sparsify` installed (never project dependencies) to include them; otherwise the row
says why it is missing. Env knobs: SAE_BENCH_STEPS (default 12), SAE_BENCH_SIZES (default 3072,12288).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusion_sae.sae import SAEConfig, SAETrainer, SyntheticSparseData, TrainConfig  # noqa: E402

D, K, BATCH = 768, 32, 4096
STEPS = int(os.environ.get("SAE_BENCH_STEPS", "12"))
WARMUP = 2
SIZES = [int(s) for s in os.environ.get("SAE_BENCH_SIZES", "3072,12288").split(",")]


def data_for(L):
    return SyntheticSparseData(d=D, num_atoms=2 * L, active=K, num_tokens=(STEPS + WARMUP) * BATCH,
                               batch_size=BATCH, seed=0)


def heldout_fvu(recon_fn, data):
    x = data.batch(10 ** 6)
    with torch.no_grad():
        r = recon_fn(x)
    return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def encoder_bound(L):
    x, W, b = torch.randn(BATCH, D), torch.randn(L, D), torch.randn(L)
    for _ in range(2):
        torch.addmm(b, x, W.t())
    t = time.perf_counter()
    n = 5
    for _ in range(n):
        torch.addmm(b, x, W.t())
    return BATCH * n / (time.perf_counter() - t)


def run_ours(L):
    data = data_for(L)
    batches = list(data)
    tr = SAETrainer(SAEConfig(d_in=D, num_latents=L, k=K), TrainConfig(lr=4e-4, batch_size=BATCH, log_every=10 ** 9,
                                                                        auxk_alpha=1 / 32))
    tr.fit(batches[:WARMUP], progress=False)
    tr2 = SAETrainer(tr.sae, TrainConfig(lr=4e-4, batch_size=BATCH, log_every=10 ** 9, auxk_alpha=1 / 32))
    tr2.opt, tr2.initialized, tr2.tokens_since_fired = tr.opt, True, tr.tokens_since_fired
    t = time.perf_counter()
    sae = tr2.fit(batches[WARMUP:], progress=False)
    tps = STEPS * BATCH / (time.perf_counter() - t)
    return tps, heldout_fvu(lambda x: sae(x).sae_out, data)


def run_saelens(L):
    try:
        import sae_lens  # noqa: F401
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except Exception as e:
        return f"not importable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); " \
               "install sae-lens into a bench venv with torch==2.13.0 and run this script with it"
    data = data_for(L)
    batches = list(data)
    cfg = TopKTrainingSAEConfig(d_in=D, d_sae=L, k=K, device="cpu")
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    with torch.no_grad():
        sae.b_dec.copy_(batches[0].mean(0))

    def step(x, i):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                       n_training_steps=i, is_logging_step=False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    for i, x in enumerate(batches[:WARMUP]):
        step(x, i)
    t = time.perf_counter()
    for i, x in enumerate(batches[WARMUP:]):
        step(x, i + WARMUP)
    tps = STEPS * BATCH / (time.perf_counter() - t)
    return tps, heldout_fvu(lambda x: sae.decode(sae.encode(x)), data)


def run_sparsify(L):
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except Exception as e:
        return f"not importable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); " \
               "install eai-sparsify into a bench venv with torch==2.13.0 and run this script with it"
    data = data_for(L)
    batches = list(data)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=L, k=K), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    with torch.no_grad():
        sae.b_dec.copy_(batches[0].mean(0))

    def step(x):
        out = sae(x)
        opt.zero_grad()
        out.fvu.backward()
        opt.step()

    for x in batches[:WARMUP]:
        step(x)
    t = time.perf_counter()
    for x in batches[WARMUP:]:
        step(x)
    tps = STEPS * BATCH / (time.perf_counter() - t)
    return tps, heldout_fvu(lambda x: sae(x).sae_out, data)


def main():
    torch.manual_seed(0)
    print(f"SAE training benchmark: d_in={D}, k={K}, batch={BATCH}, {STEPS} timed steps after {WARMUP} warm-up, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, load avg {os.getloadavg()[0]:.1f}")
    rows, notes = [], []
    for L in SIZES:
        bound = encoder_bound(L)
        ours = run_ours(L)
        rows.append((L, "diffusion-sae (ours)", ours[0], ours[1], f"{ours[0] / bound:.2f} of encoder-matmul bound "
                                                                   f"({bound:,.0f} tok/s)"))
        for name, fn in (("SAELens TopK", run_saelens), ("EleutherAI sparsify", run_sparsify)):
            try:
                r = fn(L)
            except Exception as e:  # a peer's API drifted: report, do not crash the table
                r = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if isinstance(r, str):
                rows.append((L, name, None, None, ""))
                notes.append(f"{name} (L={L}): {r}")
            else:
                rows.append((L, name, r[0], r[1], f"ours is {ours[0] / r[0]:.2f}x"))
    print(f"\n{'L':>6}  {'implementation':<22} {'tokens/s':>10} {'FVU':>8}  note")
    for L, name, tps, fvu, note in rows:
        t = f"{tps:,.0f}" if tps is not None else "n/a"
        f = f"{fvu:.4f}" if fvu is not None else "n/a"
        print(f"{L:>6}  {name:<22} {t:>10} {f:>8}  {note}")
    for n in dict.fromkeys(notes):
        print("note:", n)


if __name__ == "__main__":
    main()
