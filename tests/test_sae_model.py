"""TopKSAE model: sparse kernels against dense autograd, shapes, sparsity, normalisation, bad input."""
import pytest
import torch

from diffusion_sae.sae import SAEConfig, SAEError, TopKSAE
from diffusion_sae.sae.kernels import sparse_decode, token_offsets, topk_encode


def _dense_reference(x, W, b, Wd, k, batch, dead, k_aux):
    pre = torch.relu(x @ W.T + b)
    n, L = pre.shape
    if batch:
        flat = pre.reshape(-1)
        idx = flat.topk(k * n).indices
        z = torch.zeros_like(flat).scatter(0, idx, flat[idx]).view(n, L)
    else:
        idx = pre.topk(k, -1).indices
        z = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    masked = pre.masked_fill(~dead, float("-inf"))
    ia = masked.topk(k_aux, -1).indices
    za = torch.zeros_like(pre).scatter(-1, ia, pre.gather(-1, ia))
    return z @ Wd, za @ Wd


@pytest.mark.parametrize("batch_topk", [False, True])
def test_sparse_kernels_match_dense_autograd(batch_topk):
    g = torch.Generator().manual_seed(1)
    n, d, L, k = 29, 12, 48, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(L, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(L, generator=g, dtype=torch.float64, requires_grad=True)
    Wd = torch.randn(L, d, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)  # b_dec
    dead = torch.arange(L) % 3 == 0
    vals, cols, rows, av, ac = topk_encode(x, W, b, k, batch_topk, dead, 5, shift=shift)
    y = sparse_decode(vals, cols, Wd, token_offsets(rows, n) if batch_topk else None)
    ya = sparse_decode(av, ac, Wd)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    loss = (y * w).sum() + (ya ** 2).sum()
    grads = torch.autograd.grad(loss, [x, W, b, Wd, shift])
    yr, yar = _dense_reference(x - shift, W, b, Wd, k, batch_topk, dead, 5)
    ref = torch.autograd.grad((yr * w).sum() + (yar ** 2).sum(), [x, W, b, Wd, shift])
    torch.testing.assert_close(y, yr)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r)


def test_bf16_encoder_product_and_workspace_keep_the_selection():
    """Mixed precision (bf16 product) selects the same latents up to near-ties, with values within bf16
    rounding, and a reused workspace buffer gives results identical to fresh allocations."""
    g = torch.Generator().manual_seed(2)
    n, d, L, k = 64, 32, 256, 8
    x, W, b, s = (torch.randn(n, d, generator=g), torch.randn(L, d, generator=g) / 6,
                  torch.randn(L, generator=g) / 10, torch.randn(d, generator=g))
    v32, c32, *_ = topk_encode(x, W, b, k, shift=s)
    ws = {}
    for _ in range(2):  # second call reuses the buffer the first one allocated
        v16, c16, *_ = topk_encode(x, W, b, k, shift=s, compute_dtype=torch.bfloat16, workspace=ws)
    assert ws["pre"].dtype == torch.bfloat16 and ws["pre"].shape == (n, L)
    assert v16.dtype == torch.float32
    same = (c32.sort(-1).values == c16.sort(-1).values).all(-1).float().mean()
    assert same > 0.8  # a token differs only where its k-th and (k+1)-th values tie within bf16 rounding
    # The k largest values themselves agree to bf16 rounding (a swapped near-tie has a near-equal value).
    torch.testing.assert_close(v16.sort(-1).values, v32.sort(-1).values, rtol=1e-2, atol=2e-2)
    v_ws, c_ws, *_ = topk_encode(x, W, b, k, shift=s, workspace=ws)  # fp32 now: the buffer is replaced
    assert ws["pre"].dtype == torch.float32
    torch.testing.assert_close(v_ws, v32, rtol=0, atol=0)
    assert torch.equal(c_ws, c32)


def test_at_most_k_nonzeros_any_leading_shape_and_consistent_views():
    sae = TopKSAE(16, 64, 5, seed=0)
    x = torch.randn(3, 7, 16)
    acts, idx = sae.encode(x)
    assert acts.shape == idx.shape == (3, 7, 5)
    dense = sae.dense_latents(x)
    assert dense.shape == (3, 7, 64)
    assert int((dense != 0).sum(-1).max()) <= 5
    # encode ⊂ pre_acts: the kept values are the k largest ReLU pre-activations.
    pre = sae.pre_acts(x)
    torch.testing.assert_close(dense.sort(-1).values[..., -5:], pre.topk(5, -1).values.sort(-1).values)
    out = sae(x)
    assert out.sae_out.shape == x.shape
    torch.testing.assert_close(out.sae_out, sae.decode(acts, idx))
    torch.testing.assert_close(sae.decode_dense(dense), sae.decode(acts, idx), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x.reshape(-1, 16)).sae_out.reshape(x.shape), out.sae_out)


def test_input_normalisation_returns_original_units():
    sae = TopKSAE(8, 32, 32, normalize_input=True, seed=0)  # k = L: the SAE is a linear map
    sae.replace_cfg(input_scale=0.01)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(32, 8))
        sae.W_enc.copy_(torch.eye(32, 8))
        sae.b_enc.fill_(10.0)  # keep every latent positive
        sae.b_dec.zero_()
    x = torch.randn(5, 8) * 100
    # x̂_n = x_n + 10·Σ rows of W_dec; in original units that is x + 10·1/scale on the 8 diagonal rows
    expect = x + 10.0 / 0.01
    torch.testing.assert_close(sae(x).sae_out, expect, rtol=1e-4, atol=1e-2)


def test_decoder_rows_unit_norm_at_init_and_seed_determinism():
    a, b = TopKSAE(10, 40, 3, seed=5), TopKSAE(10, 40, 3, seed=5)
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(40))
    assert torch.equal(a.W_enc, b.W_enc) and a.W_dec.is_contiguous()


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(SAEError, match="k=65 is larger than num_latents=64"):
        TopKSAE(16, 64, 65)
    with pytest.raises(SAEError, match="d_in"):
        SAEConfig(d_in=0, num_latents=4, k=1)
    sae = TopKSAE(16, 64, 4)
    with pytest.raises(SAEError, match="input width 15 does not match the SAE's d_in=16"):
        sae.encode(torch.randn(2, 15))
    for fn in (sae.pre_acts, sae, sae.dense_latents):
        with pytest.raises(SAEError):
            fn(torch.randn(4, 17))


def test_config_is_immutable_and_the_model_holds_no_trainer_state():
    import dataclasses

    from diffusion_sae.sae import SAETrainer, SyntheticSparseData, TrainConfig

    cfg = SAEConfig(d_in=16, num_latents=64, k=4, batch_topk=True, normalize_input=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 8
    data = SyntheticSparseData(d=16, num_atoms=64, active=3, num_tokens=4096, batch_size=512, seed=0)
    tr = SAETrainer(cfg, TrainConfig(lr=3e-3, batch_size=512, seed=0, calibrate_tokens=1024))
    sae = tr.fit(data, progress=False)
    # the trainer changed the SAE's config by replacing it; the caller's config is as it was
    assert sae.cfg is not cfg and cfg.threshold == 0.0 and cfg.input_scale == 1.0
    assert sae.cfg.threshold > 0 and sae.cfg.input_scale != 1.0
    assert sae.threshold == sae.cfg.threshold                         # one home: the config
    assert "threshold" not in dict(sae.named_buffers()) and not hasattr(sae, "workspace")
    assert tr.workspace is None                                       # freed when fit ends


@pytest.mark.parametrize("norm", [dict(), dict(token_norm="standardize"), dict(token_norm="rescale_norm"), dict(normalize_input=True)])
def test_decode_change_is_the_difference_of_two_decodes(norm):
    """decode_change(δ) = decode(z + δ) − decode(z) for every normalisation, in one sparse product."""
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4, seed=0, **norm, **({"input_scale": 2.5} if norm.get("normalize_input") else {})).double()
    x = torch.randn(7, 16, dtype=torch.float64) * 3 + 1
    acts, idx = sae.encode(x)
    delta = torch.randn_like(acts) * (torch.rand_like(acts) < 0.5)
    want = sae.decode(acts + delta, idx, x=x) - sae.decode(acts, idx, x=x)
    torch.testing.assert_close(sae.decode_change(delta, idx, x=x), want, rtol=1e-10, atol=1e-10)
    assert want.abs().max() > 1e-3
    if norm.get("token_norm"):
        with pytest.raises(SAEError, match="pass x="):
            sae.decode_change(delta, idx)
