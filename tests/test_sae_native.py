"""Compiled CPU kernels (diffusion_sae/sae/native.py): same selection, losses and gradients as the torch path."""
import pytest
import torch

from diffusion_sae.sae import SAEConfig, SAETrainer, SyntheticSparseData, TopKSAE, TrainConfig, cpu_backend, native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"compiled kernels unavailable: {native.why_unavailable()}")


@pytest.fixture(autouse=True)
def screen_small_sizes(monkeypatch):
    """The int8 screen normally skips products as small as these tests' (native.SCREEN_MIN_SIZE); here it runs."""
    monkeypatch.setattr(native, "SCREEN_MIN_SIZE", 0)


def _check_topk(pre, k, bias=None, mask=None):
    vals, cols = native.topk_rows(pre, k, col_mask=mask, bias=bias)
    ref = pre.float() + (bias if bias is not None else 0)
    if mask is not None:
        ref = ref.masked_fill(~mask, float("-inf"))
    want = ref.topk(k, dim=-1).values.relu()
    assert torch.equal(vals.sort(-1).values, want.sort(-1).values)
    # the indices point at the values they report, are distinct, and respect the mask
    got = torch.gather(pre.float() + (bias if bias is not None else 0), 1, cols).relu()
    assert torch.equal(got, vals)
    assert all(len(set(r.tolist())) == k for r in cols)
    if mask is not None:
        assert bool(mask[cols].all())


@pytest.mark.parametrize("L,k", [(40, 7), (1000, 1), (1000, 32), (3072, 32), (97, 97)])
def test_topk_rows_equals_torch_topk(L, k):
    g = torch.Generator().manual_seed(L + k)
    pre = torch.randn(64, L, generator=g)
    bias = torch.randn(L, generator=g) * 0.1
    _check_topk(pre, k)
    _check_topk(pre, k, bias=bias)
    _check_topk(pre.bfloat16(), k, bias=bias)  # the bf16 product: values read exactly, bias added in fp32
    mask = torch.rand(L, generator=g) < 0.5
    mask[:k] = True
    _check_topk(pre, k, bias=bias, mask=mask)


def test_topk_rows_ties_and_all_negative_rows():
    pre = torch.cat([torch.zeros(3, 200), -torch.rand(3, 200)])
    vals, cols = native.topk_rows(pre, 16)
    assert torch.equal(vals, torch.zeros(6, 16))  # ReLU: nothing positive, zeros at distinct latents
    assert all(len(set(r.tolist())) == 16 for r in cols)
    with pytest.raises(ValueError, match="fewer than k"):
        native.topk_rows(pre, 4, col_mask=torch.zeros(200, dtype=torch.bool))


def _loss_and_grads(sae, x, dead, k_aux, workspace):
    sae.zero_grad(set_to_none=True)
    out = cpu_backend.training_forward(sae, x, dead_mask=dead, k_aux=k_aux, workspace=workspace)
    (out.fvu + 0.25 * out.auxk_loss).backward()
    cpu_backend.project_decoder_grad(sae, workspace)
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return out, grads


@pytest.fixture
def screen_calls(monkeypatch):
    """Counts calls of native.screened_topk (to show which selection a forward used)."""
    calls = []
    real = native.screened_topk

    def spy(*a, **kw):
        calls.append(a[3])
        return real(*a, **kw)
    monkeypatch.setattr(native, "screened_topk", spy)
    return calls


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("with_aux", [False, True])
def test_fused_loss_and_gradients_equal_torch_path(with_aux, screen, screen_calls):
    if screen and not native.screen_supported():
        pytest.skip("no AVX512-VNNI: int8 screening unavailable")
    torch.manual_seed(0)
    sae = TopKSAE(48, 200, 6, seed=1)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.05)
    x = torch.randn(300, 48)
    # 40 dead latents: few enough that the screened path keeps screening (AuxK on the dead ones' product)
    dead = (torch.arange(200) % 5 == 0) if with_aux else None
    ref, g_ref = _loss_and_grads(sae, x, dead, 10, None)           # torch path (no workspace)
    got, g_got = _loss_and_grads(sae, x, dead, 10, {"screen": screen})  # compiled path, trainer mode
    assert len(screen_calls) == int(screen)
    assert torch.equal(got.latent_indices.sort(-1).values, ref.latent_indices.sort(-1).values)
    torch.testing.assert_close(got.fvu, ref.fvu, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.auxk_loss, ref.auxk_loss, rtol=1e-5, atol=1e-7)
    if with_aux:
        assert float(got.auxk_loss.detach()) > 0
    torch.testing.assert_close(got.sae_out, ref.sae_out, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_backward_accumulates_into_existing_gradients():
    torch.manual_seed(0)
    sae = TopKSAE(32, 96, 4, seed=2)
    x = torch.randn(128, 32)
    _, once = _loss_and_grads(sae, x, None, None, {})
    sae.zero_grad(set_to_none=True)
    ws = {}
    for _ in range(2):  # no zero_grad in between: the second backward must add, not overwrite or double
        out = cpu_backend.training_forward(sae, x, workspace=ws)
        out.fvu.backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name], rtol=1e-5, atol=1e-7, msg=name)


def _train(steps, native_on, threads=None, autocast="none"):
    data = SyntheticSparseData(d=64, num_atoms=24, active=4, num_tokens=steps * 512, batch_size=512, seed=3)
    tr = SAETrainer(SAEConfig(d_in=64, num_latents=192, k=8),
                    TrainConfig(batch_size=512, log_every=10 ** 9, seed=0, autocast=autocast, auxk_alpha=1 / 32,
                                dead_tokens_threshold=1024))
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    old = native.set_enabled(native_on)
    try:
        sae = tr.fit(list(data), progress=False)
    finally:
        native.set_enabled(old)
        torch.set_num_threads(old_threads)
    return sae, tr


def test_trainer_on_compiled_path_matches_torch_path():
    a, tr_a = _train(8, True)
    b, tr_b = _train(8, False)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert abs(tr_a.history[-1]["fvu"] - tr_b.history[-1]["fvu"]) < 1e-5
    # AuxK was active (latents went dead within 1024 tokens) on both paths
    assert tr_a.history[-1]["auxk"] > 0 and tr_b.history[-1]["auxk"] > 0


def test_compiled_path_is_deterministic_across_thread_counts():
    a, _ = _train(3, True, threads=1)
    b, _ = _train(3, True, threads=2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_compiled_path_bf16_product_tracks_fp32():
    a, tr_a = _train(6, True, autocast="bf16")
    b, tr_b = _train(6, True)
    assert abs(tr_a.history[-1]["fvu"] - tr_b.history[-1]["fvu"]) < 0.02 * tr_b.history[-1]["fvu"] + 1e-3


def test_bf16_sources_change_gradients_by_bf16_rounding_only():
    # Mixed precision: the weight-gradient pass may read bf16 copies of xs and of the residual (fp32
    # sums). Same selection both times, so the difference is that rounding alone.
    torch.manual_seed(0)
    sae = TopKSAE(64, 256, 8, seed=4)
    xn = torch.randn(512, 64)
    xs = xn - sae.b_dec.detach()
    vals, cols = native.topk_rows(xs @ sae.W_enc.detach().t(), 8, bias=sae.b_enc)
    tv = (xn - xn.mean(0)).pow(2).sum()
    none_v, none_c = vals.new_empty(512, 0), cols.new_empty(512, 0)
    grads = []
    for low in (None, xs.bfloat16()):
        sae.zero_grad(set_to_none=True)
        _, fvu, _ = native.FusedDecodeLoss.apply(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, xn, xs, vals, cols,
                                                 none_v, none_c, tv, 1.0, None, low)
        fvu.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name in grads[0]:
        err = float((grads[1][name] - grads[0][name]).norm() / grads[0][name].norm())
        if name.startswith("W"):
            assert 0 < err < 0.01, (name, err)
        else:  # bias gradients come from the fp32 dot products and residual sums
            assert err == 0, (name, err)


# ---------------------------------------------------------------- int8 screening (screen_int8_cpu.c)
def _selection_sets(vals, cols, L):
    """[N, L] mask of the latents each token selected with a positive value (ReLU-zero slots may differ)."""
    return torch.zeros(cols.shape[0], L, dtype=torch.bool).scatter_(1, cols, vals > 0)


needs_vnni = pytest.mark.skipif(not native.available() or not native.screen_supported(),
                                reason="int8 screening needs the compiled kernels built with AVX512-VNNI")


@needs_vnni
@pytest.mark.parametrize("n,d,L,k,exact", [(300, 70, 1000, 8, "fp32"), (257, 64, 3000, 32, "bf16"),
                                            (64, 768, 4096, 32, "fp32"), (40, 13, 50, 20, "fp32")])
def test_screened_topk_equals_exact_topk(n, d, L, k, exact):
    # shapes off the kernel's blocks on purpose: n not a multiple of 12 tokens, L of 32 latents, d of 4
    g = torch.Generator().manual_seed(n + L)
    xs = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 3  # tokens of different norms
    W = torch.randn(L, d, generator=g) / d ** 0.5
    W[::7] *= 2.5  # latents of different norms too (per-latent scales)
    b = torch.randn(L, generator=g) * 0.05
    xe, We = (xs, W) if exact == "fp32" else (xs.bfloat16(), W.bfloat16())
    vals, cols = native.screened_topk(xs, W, b, k, min(2 * k, L), xe.dtype, xe if exact == "fp32" else None)
    pre = xe.float() @ We.float().t() + b  # the exact pre-activations in the step's precision
    want_vals, want_cols = pre.relu().topk(k, dim=-1)
    # the same latents for every token (ReLU-zero slots may differ), the values they report are exact
    torch.testing.assert_close(vals.sort(-1).values, want_vals.sort(-1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vals, pre.gather(1, cols).relu(), rtol=1e-5, atol=1e-5)
    assert torch.equal(_selection_sets(vals, cols, L), _selection_sets(want_vals, want_cols, L))
    assert all(len(set(r.tolist())) == k for r in cols)


@needs_vnni
def test_screened_topk_ties_zero_tokens_and_bad_arguments():
    # all-zero tokens and equal biases: every pre-activation is a tie; k distinct latents must come back
    xs = torch.zeros(30, 16)
    xs[::2] = torch.randn(15, 16)
    W = torch.randn(300, 16)
    b = torch.full((300,), 0.5)
    b[:100] = 1.0
    vals, cols = native.screened_topk(xs, W, b, 10, 20)
    want = (xs @ W.t() + b).relu().topk(10, dim=-1).values
    torch.testing.assert_close(vals.sort(-1).values, want.sort(-1).values, rtol=1e-5, atol=1e-5)
    assert all(len(set(r.tolist())) == 10 for r in cols)
    assert bool((cols[1::2] < 100).all())  # zero tokens: the larger biases win
    with pytest.raises(ValueError, match="k <= m <= L"):
        native.screened_topk(xs, W, b, 10, 5)
    with pytest.raises(ValueError, match="k <= m <= L"):
        native.screened_topk(xs, W, b, 10, 301)


@needs_vnni
def test_trainer_screening_matches_exact_selection(screen_calls):
    # fp32 steps: screened and exact selections agree, so the weights agree to summation order
    def train(screen):
        data = SyntheticSparseData(d=64, num_atoms=400, active=8, num_tokens=6 * 1024, batch_size=1024, seed=5)
        tr = SAETrainer(SAEConfig(d_in=64, num_latents=512, k=16),
                        TrainConfig(batch_size=1024, log_every=10 ** 9, seed=0, int8_screen=screen))
        return tr.fit(list(data), progress=False), tr
    a, tr_a = train(True)
    assert len(screen_calls) == 6
    b, tr_b = train(False)
    assert len(screen_calls) == 6
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert abs(tr_a.history[-1]["fvu"] - tr_b.history[-1]["fvu"]) < 1e-5



@needs_vnni
@pytest.mark.parametrize("exact", [torch.float32, torch.bfloat16])
def test_screen_certificate_sends_doubtful_tokens_to_the_dense_product(exact):
    g = torch.Generator().manual_seed(11)
    n, d, L, k = 200, 96, 1024, 16
    xs = torch.randn(n, d, generator=g)
    W = torch.randn(L, d, generator=g) / d ** 0.5
    b = torch.randn(L, generator=g) * 0.05
    xe, We = (xs, W) if exact == torch.float32 else (xs.bfloat16(), W.bfloat16())
    pre = xe.float() @ We.float().t() + b
    want = pre.relu().topk(k, dim=-1)
    want_sets = _selection_sets(want.values, want.indices, L)
    # z huge: no token is certified, all go through the dense fallback, which must be exact too
    ws = {}
    vals, cols = native.screened_topk(xs, W, b, k, 2 * k, exact, workspace=ws, z=1e9)
    assert ws["screen_dense_tokens"] == n and ws["screen_tokens"] == n
    assert torch.equal(_selection_sets(vals, cols, L), want_sets)
    torch.testing.assert_close(vals, pre.gather(1, cols).relu(), rtol=1e-5, atol=1e-5)
    # default z on ordinary data: (almost) everything certified, same answer
    ws = {}
    vals, cols = native.screened_topk(xs, W, b, k, 2 * k, exact, workspace=ws)
    assert ws["screen_dense_tokens"] <= n // 20
    assert torch.equal(_selection_sets(vals, cols, L), want_sets)


@needs_vnni
def test_screen_smooths_outlier_dimensions():
    g = torch.Generator().manual_seed(12)
    n, d, L, k = 240, 128, 2048, 16
    xs = torch.randn(n, d, generator=g)
    xs[:, :3] *= 40  # a few huge dimensions, as text encoders have
    W = torch.randn(L, d, generator=g) / d ** 0.5
    b = torch.zeros(L)
    x_mul, w_mul = native._smoothing(xs)
    assert x_mul is not None and bool((w_mul[:3] > 4).all()) and bool((w_mul[3:] == 1).all())
    assert native._smoothing(torch.randn(n, d, generator=g)) == (None, None)
    ws = {}
    vals, cols = native.screened_topk(xs, W, b, k, 2 * k, workspace=ws)
    pre = xs @ W.t() + b
    want = pre.relu().topk(k, dim=-1)
    assert torch.equal(_selection_sets(vals, cols, L), _selection_sets(want.values, want.indices, L))
    # without smoothing nearly every token would fail its certificate; with it most pass
    assert ws["screen_dense_tokens"] < n // 4


@needs_vnni
def test_screening_skips_small_products(screen_calls, monkeypatch):
    monkeypatch.setattr(native, "SCREEN_MIN_SIZE", 1 << 18)
    sae = TopKSAE(48, 400, 6, seed=1)  # d * L = 19,200: the dense product is as fast
    cpu_backend.training_forward(sae, torch.randn(64, 48), workspace={"screen": True})
    assert screen_calls == []
    big = TopKSAE(256, 1024, 16, seed=1)
    cpu_backend.training_forward(big, torch.randn(64, 256), workspace={"screen": True})
    assert len(screen_calls) == 1


@needs_vnni
def test_screening_pauses_when_the_certificate_fails_often(screen_calls):
    sae = TopKSAE(48, 400, 6, seed=1)
    x = torch.randn(64, 48)
    ws = {"screen": True, "screen_last_dense_fraction": 0.6}
    cpu_backend.training_forward(sae, x, workspace=ws)
    assert screen_calls == [] and ws["screen_paused_steps"] == 63
    ws["screen_paused_steps"] = 0
    cpu_backend.training_forward(sae, x, workspace=ws)
    assert len(screen_calls) == 1


@needs_vnni
def test_trainer_logs_the_dense_fraction_of_the_screen():
    data = SyntheticSparseData(d=64, num_atoms=400, active=8, num_tokens=4 * 1024, batch_size=1024, seed=5)
    tr = SAETrainer(SAEConfig(d_in=64, num_latents=512, k=16), TrainConfig(batch_size=1024, log_every=2, seed=0))
    tr.fit(list(data), progress=False)
    fracs = [h["screen_dense_fraction"] for h in tr.history]
    assert len(fracs) == 2 and all(0.0 <= f <= 0.05 for f in fracs)
