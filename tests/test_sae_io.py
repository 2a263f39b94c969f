"""Checkpoints: round trip, atomicity, bad files, and the four foreign formats against their own forwards."""
import json

import pytest
import torch
from safetensors.torch import save_file

from diffusion_sae.sae import SAEError, TopKSAE, detect_format, load_sae

D, L, K = 12, 40, 5


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _x(n=23):
    return _rand(n, D, seed=99) * 3 + 1


def _assert_same(sae, x, ref_out, ref_dense=None):
    torch.testing.assert_close(sae(x).sae_out, ref_out, rtol=1e-5, atol=1e-5)
    if ref_dense is not None:
        torch.testing.assert_close(sae.dense_latents(x), ref_dense, rtol=1e-5, atol=1e-5)


def test_round_trip_and_hookpoint_folders(tmp_path):
    sae = TopKSAE(D, L, K, seed=3, hookpoint="unet.up_blocks.1.attentions.1")
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    sae.save_pretrained(tmp_path / "run" / "unet.up_blocks.1.attentions.1")
    (tmp_path / "run" / "other").mkdir()
    TopKSAE(D, L, K, seed=4).save_pretrained(tmp_path / "run" / "other")
    assert not [p for p in (tmp_path / "run" / "other").iterdir() if p.name.endswith(".tmp")]
    x = _x()
    loaded = TopKSAE.from_pretrained(tmp_path / "run", hookpoint="unet.up_blocks.1.attentions.1")
    assert detect_format(tmp_path / "run" / "other") == "diffusion-sae"
    _assert_same(loaded, x, sae(x).sae_out)
    with pytest.raises(SAEError, match="several hookpoints"):
        TopKSAE.from_pretrained(tmp_path / "run")
    with pytest.raises(SAEError, match="not found; available"):
        TopKSAE.from_pretrained(tmp_path / "run", hookpoint="nope")


def test_missing_truncated_unknown_and_offline_hub(tmp_path):
    sae = TopKSAE(D, L, K, seed=0)
    sae.save_pretrained(tmp_path / "a")
    data = (tmp_path / "a" / "sae.safetensors").read_bytes()
    (tmp_path / "a" / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEError, match="truncated"):
        load_sae(tmp_path / "a")
    (tmp_path / "a" / "sae.safetensors").unlink()
    with pytest.raises(SAEError, match="missing checkpoint file"):
        load_sae(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "weights.bin").write_bytes(b"xx")
    with pytest.raises(SAEError, match="unknown SAE checkpoint format"):
        load_sae(tmp_path / "b")
    with pytest.raises(SAEError, match="no such checkpoint folder"):
        load_sae(tmp_path / "nope")
    with pytest.raises(SAEError, match="Hugging Face hub") as e:
        TopKSAE.from_pretrained("someone/not-a-cached-repo")
    assert "\n" not in str(e.value)


def _sparsify_files(folder, extra_cfg):
    W, b, Wd, bd = _rand(L, D, seed=1), _rand(L, seed=2), _rand(L, D, seed=3), _rand(D, seed=4)
    Wd = Wd / Wd.norm(dim=1, keepdim=True)
    folder.mkdir(parents=True)
    save_file({"encoder.weight": W, "encoder.bias": b, "W_dec": Wd, "b_dec": bd}, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 4, "normalize_decoder": True, "num_latents": L,
                                                  "k": K, "multi_topk": False, "d_in": D, **extra_cfg}))
    return W, b, Wd, bd


@pytest.mark.parametrize("unit_norm", [False, True])
def test_saeuron_and_sparsify(tmp_path, unit_norm):
    extra = {"batch_topk": True, "sample_topk": False, "input_unit_norm": unit_norm}
    W, b, Wd, bd = _sparsify_files(tmp_path / "up.1.1", extra)
    x = _x()
    # SAeUron's forward: optional per-token standardisation, ReLU, per-token TopK, decode, de-standardise.
    xi, mean, std = x, None, None
    if unit_norm:
        mean = x.mean(-1, keepdim=True)
        xi = x - mean
        std = xi.std(-1, keepdim=True)
        xi = xi / (std + 1e-5)
    a = torch.relu((xi - bd) @ W.T + b)
    top = a.topk(K, -1)
    z = torch.zeros_like(a).scatter(-1, top.indices, top.values)
    out = z @ Wd + bd
    if unit_norm:
        out = out * std + mean
    sae = load_sae(tmp_path / "up.1.1")
    assert detect_format(tmp_path / "up.1.1") == "saeuron"
    _assert_same(sae, x, out, z)


def _openai_forward(x, E, D_, b_pre, b_lat, k):
    u = (x - b_pre) @ E.T + b_lat
    top = u.topk(k, -1)  # TopK first, ReLU after: the OpenAI / Steerers order
    z = torch.zeros_like(u).scatter(-1, top.indices, torch.relu(top.values))
    return z @ D_.T + b_pre, z


def _openai_files(folder, with_stats=None):
    E, Dm, b_pre, b_lat = _rand(L, D, seed=5), _rand(D, L, seed=6), _rand(D, seed=7), _rand(L, seed=8) - 1.5
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"encoder.weight": E, "decoder.weight": Dm, "pre_bias": b_pre, "latent_bias": b_lat,
                               "stats_last_nonzero": torch.zeros(L, dtype=torch.long)}}, folder / "state_dict.pth")
    (folder / "config.json").write_text(json.dumps({"n_dirs_local": L, "d_model": D, "k": K, "auxk": 32,
                                                     "dead_steps_threshold": 2441, "auxk_coef": 1 / 32}))
    if with_stats is not None:
        torch.save(with_stats[0], folder / "mean.pt")
        torch.save(with_stats[1], folder / "std.pt")
    return E, Dm, b_pre, b_lat


def test_concept_steerers(tmp_path):
    E, Dm, b_pre, b_lat = _openai_files(tmp_path / "final")
    x = _x()
    out, z = _openai_forward(x, E, Dm, b_pre, b_lat, K)
    sae = load_sae(tmp_path / "final")
    assert detect_format(tmp_path / "final") == "steerers"
    _assert_same(sae, x, out, z)
    # Steering matrix: ReLU over all latents, decoded without bias.
    steer = torch.relu((x - b_pre) @ E.T + b_lat) @ Dm.T
    torch.testing.assert_close(sae.decode_dense(sae.pre_acts(x), add_bias=False), steer, rtol=1e-5, atol=1e-5)


def test_sdxl_unbox_latent_stats_and_input_standardisation(tmp_path):
    lat_mean, lat_std = _rand(L, seed=9).abs(), _rand(L, seed=10).abs()
    E, Dm, b_pre, b_lat = _openai_files(tmp_path / "a", (lat_mean, lat_std))
    x = _x()
    sae = load_sae(tmp_path / "a")
    assert detect_format(tmp_path / "a") == "sdxl-unbox"
    out, z = _openai_forward(x, E, Dm, b_pre, b_lat, K)
    _assert_same(sae, x, out, z)
    assert torch.equal(sae.latent_mean, lat_mean) and torch.equal(sae.latent_std, lat_std)
    # [d]-shaped mean/std: the SAE works on (x − m)/s and its output is mapped back.
    m, s = _rand(D, seed=11), _rand(D, seed=12).abs() + 0.5
    E, Dm, b_pre, b_lat = _openai_files(tmp_path / "b", (m, s))
    out_s, z_s = _openai_forward((x - m) / s, E, Dm, b_pre, b_lat, K)
    _assert_same(load_sae(tmp_path / "b"), x, out_s * s + m, z_s)


@pytest.mark.parametrize("variant", ["v6_rescale", "v5_no_bdec_layernorm", "v6_constant_norm"])
def test_saelens_topk(tmp_path, variant):
    W_enc, W_dec, b_enc, b_dec = _rand(D, L, seed=13), _rand(L, D, seed=14) * 2, _rand(L, seed=15), _rand(D, seed=16)
    folder = tmp_path / variant
    folder.mkdir()
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, folder / "sae_weights.safetensors")
    rescale = variant == "v6_rescale"
    apply_bdec = variant != "v5_no_bdec_layernorm"
    norm = {"v6_rescale": "none", "v5_no_bdec_layernorm": "layer_norm", "v6_constant_norm": "constant_norm_rescale"}[variant]
    if variant.startswith("v6"):
        cfg = {"architecture": "topk", "d_in": D, "d_sae": L, "k": K, "apply_b_dec_to_input": apply_bdec,
               "normalize_activations": norm, "rescale_acts_by_decoder_norm": rescale,
               "metadata": {"hook_name": "blocks.3.hook_resid_post"}}
    else:
        cfg = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "d_in": D,
               "d_sae": L, "apply_b_dec_to_input": apply_bdec, "normalize_activations": norm, "hook_name": "h"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    # SAELens' forward as it defines it.
    x = _x()
    xi = x
    if norm == "layer_norm":
        mu = xi.mean(-1, keepdim=True)
        xi = xi - mu
        sd = xi.std(-1, keepdim=True)
        xi = xi / (sd + 1e-5)
    elif norm == "constant_norm_rescale":
        coeff = D ** 0.5 / x.norm(dim=-1, keepdim=True)
        xi = x * coeff
    pre = (xi - b_dec * apply_bdec) @ W_enc + b_enc
    n = W_dec.norm(dim=-1)
    if rescale:
        pre = pre * n
    top = pre.topk(K, -1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    out = (acts / n if rescale else acts) @ W_dec + b_dec
    if norm == "layer_norm":
        out = out * sd + mu
    elif norm == "constant_norm_rescale":
        out = out / coeff
    sae = load_sae(folder)
    assert detect_format(folder) == "saelens"
    torch.testing.assert_close(sae(x).sae_out, out, rtol=1e-4, atol=1e-4)
    if rescale:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(L))
