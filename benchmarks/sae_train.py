"""SAE training throughput and quality: ours vs SAELens (TopK) and EleutherAI sparsify, same activations.

d_in = 768, L = 3072 and 12288, k = 32, batch 4096, fp32 Adam, synthetic sparse activations (768-d,
2L unit-norm atoms, 32 active per token). For every implementation: tokens/s over timed steps (after
warm-up) and the FVU on held-out tokens after the same number of training tokens. Ours is also reported as a fraction
of the bound set by the encoder matrix product alone (x @ W_encᵀ + b, timed in the same run).

Peers are imported from the running interpreter: `make bench-venv` builds .bench-venv (torch 2.13.0
CPU, this project, and the peers pinned in benchmarks/requirements-peers.txt; never project
dependencies) and `make bench` runs this file with its python. Under another interpreter a missing
peer's row says why. Each peer runs its own library's training step (see run_saelens /
run_sparsify) with the benchmark's fixed settings: same synthetic batches, d, L, k, batch, Adam at a
constant lr 4e-4, fp32, CPU, the same thread count, warm-up steps untimed.
Env knobs: SAE_BENCH_STEPS (default 12), SAE_BENCH_SIZES (default 3072,12288).
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


PEER_HINT = "run `make bench-venv` and this script with .bench-venv/bin/python (pins: benchmarks/requirements-peers.txt)"


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _timed(step, batches):
    """Warm-up steps untimed, then tokens/s over the timed ones."""
    for i, x in enumerate(batches[:WARMUP]):
        step(x, i)
    t = time.perf_counter()
    for i, x in enumerate(batches[WARMUP:]):
        step(x, i + WARMUP)
    return STEPS * BATCH / (time.perf_counter() - t)


def run_saelens(L):
    """SAELens's own training step: `SAETrainer.step` (the seam its `fit` loop calls) on a TopKTrainingSAE.

    Everything not fixed by the benchmark (d, L, k, batch, constant Adam lr 4e-4, fp32, CPU) is
    SAELens's default: decoder init norm 0.1, activations rescaled by decoder norm, b_dec from zero,
    MSE loss + TopK AuxK (dead window 1000 steps, so inactive in a short run), grad clip 1.0,
    Adam betas (0.9, 0.999). Its `fit` adds only logging/checkpointing around this step."""
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer as LensTrainer
    except Exception as e:
        return f"not importable here ({_why(e)}); {PEER_HINT}"
    data = data_for(L)
    batches = list(data)
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=L, k=K, dtype="float32", device="cpu"))
    tcfg = SAETrainerConfig(total_training_samples=len(batches) * BATCH, train_batch_size_samples=BATCH,
                            lr=4e-4, lr_end=4e-5, lr_scheduler_name="constant", device="cpu", autocast=False)
    # lr_end: what SAELens's runner config fills in (lr / 10); unused by the constant schedule.
    trainer = LensTrainer(cfg=tcfg, sae=sae, data_provider=iter(batches))

    def step(x, i):
        trainer.maybe_reset_sparsity()
        trainer.step(x)
        trainer.n_training_steps += 1

    tps = _timed(step, batches)
    sae.eval()
    return tps, heldout_fvu(lambda x: sae(x), data)


def run_sparsify(L):
    """EleutherAI sparsify's training step as its `Trainer` does it for an autoencoder hookpoint
    (the Trainer itself only runs on a language model's hooks): b_dec = batch mean on the first
    step, decoder rows renormalised before each forward, loss = FVU + auxk_alpha·AuxK with the
    batch's total variance, gradient parallel to decoder rows removed, optimizer step, dead-latent
    counters in tokens. Benchmark-fixed: torch Adam (sparsify's "adam" choice without
    bitsandbytes) at constant lr 4e-4, and auxk_alpha 1/32 as ours (sparsify's default is 0; no
    latent can be dead within its 10M-token threshold here, so AuxK is never computed either way)."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except Exception as e:
        return f"not importable here ({_why(e)}); {PEER_HINT}"
    data = data_for(L)
    batches = list(data)
    torch.manual_seed(0)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=L, k=K), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    auxk_alpha, dead_threshold = 1 / 32, 10_000_000
    since_fired = torch.zeros(L, dtype=torch.long)

    def step(x, i):
        if i == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire = torch.zeros(L, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0

    tps = _timed(step, batches)
    sae.set_decoder_norm_to_unit_norm()  # the Trainer renormalises before every forward, so also before eval
    return tps, heldout_fvu(lambda x: sae(x).sae_out, data)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("sae-lens", "eai-sparsify"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} not installed")
    return ", ".join(out)


def main():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"SAE training benchmark: d_in={D}, k={K}, batch={BATCH}, {STEPS} timed steps after {WARMUP} warm-up, "
          f"torch {torch.__version__}, {threads} threads, fp32, load avg {os.getloadavg()[0]:.1f}; {_versions()} "
          f"({sys.executable})")
    rows, notes = [], []
    for L in SIZES:
        bound = encoder_bound(L)
        ours = run_ours(L)
        rows.append((L, "diffusion-sae (ours)", ours[0], ours[1], f"{ours[0] / bound:.2f} of encoder-matmul bound "
                                                                   f"({bound:,.0f} tok/s)"))
        for name, fn in (("SAELens TopK", run_saelens), ("EleutherAI sparsify", run_sparsify)):
            torch.set_num_threads(threads)  # every implementation runs with the same thread count
            try:
                r = fn(L)
            except Exception as e:  # a peer's API drifted: report, do not crash the table
                r = f"failed: {_why(e)}"
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
