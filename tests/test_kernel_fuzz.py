"""Fuzz the compiled SAE kernels (sae/native.py, sae/csrc/) with extreme inputs.

±1e30, denormals, −0, ±inf, NaN, all-equal rows, k = L, short rows, and indices out of range: no case
may crash the process; every case either matches the torch path or raises SAEError (NaN).

The kernels run in a child process (this file run as a script), so that a segfault fails the test
instead of killing pytest. The child runs every case it can on this CPU: the kernels built for this
machine (-march=native: the AVX-512 branches where the CPU has them, the int8 screen where it has
VNNI) and, on x86-64, built again for x86-64-v3 (AVX2 only: the portable branches).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()


def _run_child(march: str | None, tmp_path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    env.pop("DIFFUSION_SAE_NATIVE", None)
    if march:
        env["DIFFUSION_SAE_NATIVE_MARCH"] = march
    # the child imports the package from this checkout
    env["PYTHONPATH"] = str(HERE.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(HERE)], capture_output=True, text=True, env=env, timeout=300)
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return proc, rows


TARGETS = [None] + (["x86-64-v3"] if platform.machine() in ("x86_64", "AMD64") else [])


@pytest.mark.parametrize("march", TARGETS, ids=lambda m: m or "native")
def test_kernels_never_crash_and_match_torch_or_raise(march, tmp_path):
    proc, rows = _run_child(march, tmp_path)
    started = [r for r in rows if r.get("event") == "start"]
    done = {r["case"]: r for r in rows if r.get("event") == "done"}
    if started and started[-1]["case"] not in done:
        pytest.fail(f"the child died (rc {proc.returncode}) in case {started[-1]['case']}: {proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = next(r for r in rows if r.get("event") == "info")
    if not info["available"]:
        pytest.skip(f"compiled kernels unavailable here: {info['why']}")
    assert len(done) == len(started) > 40
    bad = [r for r in done.values() if r["result"] not in ("match", "raised")]
    assert not bad, bad
    # NaN inputs are refused, finite ones (however extreme) are answered
    for r in done.values():
        if r["expect"] != "either":
            assert r["result"] == ("raised" if r["expect"] == "raise" else "match"), r


# ---------------------------------------------------------------------------------------------
# the child
# ---------------------------------------------------------------------------------------------
def _child() -> None:  # pragma: no cover - runs in a subprocess
    import torch

    from diffusion_sae.sae import SAEConfig, SAEError, TrainConfig, native
    from diffusion_sae.sae.train import SAETrainer

    torch.manual_seed(0)
    print(json.dumps({"event": "info", "available": native.available(), "why": native.why_unavailable(),
                      "screen": native.available() and native.screen_supported()}), flush=True)
    if not native.available():
        return

    def case(name: str, expect: str, fn) -> None:
        print(json.dumps({"event": "start", "case": name}), flush=True)
        try:
            fn()
            result = "match"
        except SAEError as e:
            result = "raised"
            msg = str(e)
        except AssertionError as e:
            result, msg = f"mismatch: {e}", None
        else:
            msg = None
        print(json.dumps({"event": "done", "case": name, "result": result, "expect": expect, "msg": msg}), flush=True)

    # -------- value generators: [N, L] fp32
    def gen(kind: str, n: int, L: int) -> torch.Tensor:
        g = torch.randn(n, L)
        if kind == "normal":
            return g
        if kind == "huge":
            return g * 1e30
        if kind == "huge_signs":
            return torch.where(g > 0, 1e30, -1e30) * torch.ones(n, L)
        if kind == "max_float":
            return torch.where(g > 0, 3.4e38, -3.4e38) * torch.ones(n, L)
        if kind == "denormal":
            return g * 1e-40
        if kind == "neg_zero":
            return torch.full((n, L), -0.0)
        if kind == "equal_rows":
            return torch.full((n, L), 2.5)
        if kind == "mixed":  # every kind of value in one row
            t = g.clone()
            flat = t.view(-1)
            vals = [1e30, -1e30, 1e-40, -1e-40, -0.0, 0.0, 3.4e38, -3.4e38]
            for i, v in enumerate(vals):
                flat[i::len(vals) * 3] = v
            return t
        if kind == "inf":
            t = g.clone()
            t[:, ::5] = float("inf")
            t[:, 1::7] = float("-inf")
            return t
        if kind == "all_neg_inf":
            return torch.full((n, L), float("-inf"))
        if kind == "nan_some":
            t = g.clone()
            t[0, 3] = float("nan")
            return t
        if kind == "nan_all":
            return torch.full((n, L), float("nan"))
        raise ValueError(kind)

    kinds = ["normal", "huge", "huge_signs", "max_float", "denormal", "neg_zero", "equal_rows", "mixed", "inf",
             "all_neg_inf", "nan_some", "nan_all"]
    shapes = [(5, 40, 8), (3, 10, 10), (4, 64, 64), (6, 300, 32), (2, 33, 1), (3, 1024, 16)]

    def check_topk(pre, k, bias, mask, vals, cols):
        n, L = pre.shape
        ref = pre.float() + (bias if bias is not None else 0)
        assert cols.shape == (n, k) and vals.shape == (n, k)
        assert int(cols.min()) >= 0 and int(cols.max()) < L, "index out of range"
        for i in range(n):
            assert len(set(cols[i].tolist())) == k, "repeated index"
        if mask is not None:
            assert bool(mask[cols].all()), "picked a masked column"
            ref = ref.masked_fill(~mask, float("-inf"))
        want = ref.topk(k, dim=1).values.clamp_min(0).sort(dim=1).values
        got = vals.sort(dim=1).values
        assert torch.equal(got, want), f"values differ: {got[:1]} vs {want[:1]}"
        # each value is the (ReLU'd) pre-activation of its own index
        assert torch.equal(vals, ref.gather(1, cols).clamp_min(0)), "value does not belong to its index"

    for kind in kinds:
        for (n, L, k) in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                for variant in ("plain", "bias", "mask"):
                    pre = gen(kind, n, L).to(dtype).contiguous()
                    bias = torch.randn(L) * (1e30 if kind.startswith("huge") else 1.0) if variant == "bias" else None
                    mask = None
                    if variant == "mask":
                        mask = torch.zeros(L, dtype=torch.bool)
                        mask[torch.randperm(L)[:max(k, L // 2)]] = True
                    expect = "raise" if kind.startswith("nan") else "match"

                    def fn(pre=pre, k=k, bias=bias, mask=mask):
                        vals, cols = native.topk_rows(pre, k, col_mask=mask, bias=bias)
                        check_topk(pre, k, bias, mask, vals, cols)

                    case(f"topk_rows {kind} {n}x{L} k={k} {str(dtype)[6:]} {variant}", expect, fn)

    # k outside [1, L] is refused before the kernel runs
    case("topk_rows k>L", "raise", lambda: _expect_value_error(native.topk_rows, torch.randn(2, 8), 9, SAEError))

    # -------- the int8 screen (CPUs with AVX512-VNNI only)
    if native.screen_supported():
        for kind in ("normal", "huge", "denormal", "neg_zero", "equal_rows", "mixed", "nan_some"):
            for (n, d, L, k) in ((24, 64, 512, 8), (13, 40, 256, 16), (12, 16, 64, 32)):
                xs = gen(kind, n, d).contiguous()
                W = torch.randn(L, d).contiguous()
                b = torch.randn(L)
                for dt in (torch.float32, torch.bfloat16):
                    def fn(xs=xs, W=W, b=b, k=k, dt=dt, L=L):
                        vals, cols = native.screened_topk(xs, W, b, k, min(2 * k, L), dt, workspace={})
                        assert int(cols.min()) >= 0 and int(cols.max()) < L, "index out of range"
                        xe, We = (xs.bfloat16().float(), W.bfloat16().float()) if dt == torch.bfloat16 else (xs, W)
                        ref = torch.relu(xe @ We.t() + b)
                        want = ref.topk(k, dim=1).values.sort(dim=1).values
                        got = vals.sort(dim=1).values
                        scale = want.abs().amax().clamp_min(1e-30)
                        both_inf = torch.isinf(want) & (want == got)
                        close = ((got - want).abs() <= 1e-4 * scale) | both_inf
                        assert bool(close.all()), f"screen differs from torch: {got[:1]} vs {want[:1]}"

                    # "mixed" holds ±3.4e38: its products overflow to inf - inf = NaN in some rows (and
                    # 3.4e38 rounds to inf in bf16); refusing them is right, answering must match torch
                    case(f"screened_topk {kind} {n}x{d} L={L} k={k} {str(dt)[6:]}",
                         "raise" if kind.startswith("nan") else "either" if kind == "mixed" else "match", fn)

    # -------- the fused decoder + losses: ids out of range are skipped, never read
    def decode_out_of_range():
        n, d, L, k = 6, 16, 32, 4
        W_dec = torch.randn(L, d, requires_grad=True)
        W_enc = torch.randn(L, d, requires_grad=True)
        b_enc = torch.zeros(L, requires_grad=True)
        b_dec = torch.zeros(d, requires_grad=True)
        xn = torch.randn(n, d)
        vals = torch.rand(n, k)
        cols = torch.tensor([[0, L, -1, 2 ** 40]] * n)
        recon, fvu, auxk = native.FusedDecodeLoss.apply(W_enc, b_enc, W_dec, b_dec, xn, xn.clone(), vals, cols,
                                                        vals.new_empty(n, 0), cols.new_empty(n, 0),
                                                        xn.pow(2).sum(), 1.0, None, None)
        fvu.backward()
        # only id 0 is in range: recon = vals[:, 0] * W_dec[0]
        assert torch.allclose(recon, vals[:, :1] * W_dec[0].detach(), atol=1e-5)

    case("decode ids out of range", "match", decode_out_of_range)

    # -------- a whole training run on the compiled path: trains (finite weights) or raises SAEError
    def train(kind: str, normalize: bool, d=64, L=256, k=8):
        x = gen(kind, 512, d)
        t = SAETrainer(SAEConfig(d_in=d, num_latents=L, k=k, normalize_input=normalize),
                       TrainConfig(batch_size=256, log_every=1))
        sae = t.fit([x], progress=False)
        for name, p in sae.named_parameters():
            assert bool(torch.isfinite(p).all()), f"{name} not finite after training"

    for kind in ("normal", "huge", "huge_signs", "max_float", "denormal", "neg_zero", "equal_rows", "mixed", "inf",
                 "nan_some"):
        for normalize in (False, True):
            # huge finite data trains when normalised; without normalisation it is refused (float32
            # overflows); data without variance (denormals underflow) is refused; near float32's limit either
            if kind == "normal" or (normalize and kind in ("huge", "huge_signs")):
                expect = "match"
            elif kind in ("max_float", "mixed") and normalize:
                expect = "either"
            else:
                expect = "raise"
            case(f"train {kind} normalize={normalize}", expect, lambda kind=kind, normalize=normalize: train(kind, normalize))
    case("train k=L", "match", lambda: train("normal", False, d=16, L=32, k=32))
    if native.screen_supported():  # d * L large enough for the trainer to screen
        for kind in ("normal", "huge", "mixed"):
            case(f"train screened {kind}", "match" if kind == "normal" else "raise",
                 lambda kind=kind: train(kind, False, d=128, L=2048, k=16))


def _expect_value_error(fn, *args):
    err = args[-1]
    try:
        fn(*args[:-1])
    except ValueError as e:
        raise err(str(e)) from None
    raise AssertionError("no error")


if __name__ == "__main__":
    _child()
