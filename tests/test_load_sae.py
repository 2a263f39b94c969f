"""load_sae(path_or_repo_id, hookpoint, subfolder): folders and hub ids, refusals, hookpoint naming.

The hub test builds a huggingface_hub cache by hand (models--org--name/snapshots/<rev>/..., refs/main)
in a temporary folder and resolves ids from it with HF_HUB_OFFLINE=1: nothing is downloaded.
"""
import json

import pytest
import torch

from diffusion_sae.errors import DiffusionSAEError
from diffusion_sae.sae import SAEError, TopKSAE, load_sae

D, L, K = 16, 64, 4
HP = "unet.up_blocks.1.attentions.1"
REV = "0123456789abcdef0123456789abcdef01234567"


def _x(n=5, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _hub_cache(tmp_path, monkeypatch, repo="org/saes"):
    """An offline huggingface_hub cache holding `repo` with two hookpoint folders; returns (cache, snapshot)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / REV
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(REV)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, snap


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch):
    _, snap = _hub_cache(tmp_path, monkeypatch)
    a = TopKSAE(D, L, K, seed=1, hookpoint=HP)
    b = TopKSAE(D, L, K, seed=2, hookpoint="unet.mid_block.attentions.0")
    a.save_pretrained(snap / "block" / HP)
    b.save_pretrained(snap / "block" / "unet.mid_block.attentions.0")
    x = _x()
    got = load_sae("org/saes", hookpoint=HP, subfolder="block")
    assert got.cfg.hookpoint == HP and got.dtype == torch.float32
    torch.testing.assert_close(got.dense_latents(x), a.dense_latents(x), rtol=0, atol=0)
    # the same through the org/name/sub/folder form, and through TopKSAE.from_pretrained
    got2 = load_sae("org/saes/block/unet.mid_block.attentions.0")
    torch.testing.assert_close(got2.W_dec, b.W_dec, rtol=0, atol=0)
    with pytest.raises(SAEError, match="several hookpoints"):
        load_sae("org/saes", subfolder="block")
    with pytest.raises(SAEError, match="has no folder 'nope'"):
        load_sae("org/saes", subfolder="nope")


def test_missing_hub_id_is_one_line_naming_it(tmp_path, monkeypatch):
    _hub_cache(tmp_path, monkeypatch)
    with pytest.raises(SAEError) as e:
        load_sae("org/not-there", hookpoint=HP)
    msg = str(e.value)
    assert "\n" not in msg and "'org/not-there'" in msg and "offline" in msg and "hf download" in msg
    assert isinstance(e.value, DiffusionSAEError)
    with pytest.raises(SAEError, match="no such checkpoint folder"):
        load_sae(tmp_path / "nothing")


def _sparsify(folder, **cfg):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    t = {"encoder.weight": torch.randn(L, D, generator=g), "encoder.bias": torch.zeros(L),
         "W_dec": torch.randn(L, D, generator=g), "b_dec": torch.zeros(D)}
    t.update(cfg.pop("_extra", {}))
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "k": K, "expansion_factor": 4, **cfg}))


def test_unsupported_variants_are_refused_in_one_line(tmp_path):
    _sparsify(tmp_path / "gm" / HP, activation="groupmax")
    with pytest.raises(SAEError, match="groupmax") as e:
        load_sae(tmp_path / "gm" / HP)
    assert "\n" not in str(e.value)
    _sparsify(tmp_path / "tc" / HP, transcode=True)
    with pytest.raises(SAEError, match="transcoder"):
        load_sae(tmp_path / "tc" / HP)
    _sparsify(tmp_path / "jr" / HP, _extra={"threshold": torch.zeros(L)})
    with pytest.raises(SAEError, match="JumpReLU"):
        load_sae(tmp_path / "jr" / HP)
    # SAELens JumpReLU
    from safetensors.torch import save_file

    sl = tmp_path / "saelens"
    sl.mkdir()
    save_file({"W_enc": torch.zeros(D, L), "W_dec": torch.zeros(L, D), "b_enc": torch.zeros(L),
               "b_dec": torch.zeros(D), "threshold": torch.zeros(L)}, str(sl / "sae_weights.safetensors"))
    (sl / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": D, "d_sae": L}))
    with pytest.raises(SAEError, match="JumpReLU SAE"):
        load_sae(sl)
    # a plain TopK sparsify checkpoint still loads, named by its hookpoint folder
    _sparsify(tmp_path / "ok" / HP, activation="topk")
    assert load_sae(tmp_path / "ok" / HP).cfg.hookpoint == HP


def test_hookpoint_comes_from_the_checkpoint_else_the_user(tmp_path):
    _sparsify(tmp_path / "run-7" / "final")          # a run folder: names no hookpoint
    assert load_sae(tmp_path / "run-7" / "final").cfg.hookpoint is None
    assert load_sae(tmp_path / "run-7" / "final", hookpoint=HP).cfg.hookpoint == HP
    TopKSAE(D, L, K, seed=0, hookpoint=HP).save_pretrained(tmp_path / "mine")
    assert load_sae(tmp_path / "mine").cfg.hookpoint == HP
    with pytest.raises(SAEError, match="trained at hookpoint"):
        load_sae(tmp_path / "mine", hookpoint="unet.mid_block")


def test_half_precision_checkpoint_loads_in_fp32_and_hooks_keep_the_activation_dtype(tmp_path):
    sae = TopKSAE(D, L, K, seed=3, hookpoint=HP, dtype=torch.bfloat16)
    sae.save_pretrained(tmp_path / "bf16")
    got = load_sae(tmp_path / "bf16")
    assert got.dtype == torch.float32
    assert load_sae(tmp_path / "bf16", dtype=None).dtype == torch.bfloat16
    x = _x().to(torch.bfloat16)
    acts, idx = got.encode(x)
    assert acts.dtype == torch.bfloat16 and got.decode(acts, idx, x=x).dtype == torch.bfloat16
    assert got.pre_acts(x).dtype == torch.bfloat16 and got.decode_dense(got.pre_acts(x)).dtype == torch.bfloat16
    # fp32 maths on bf16 input equals the fp32 path on the same (bf16-representable) values up to output rounding
    ref = got.decode_dense(got.pre_acts(x.float()))
    torch.testing.assert_close(got.decode_dense(got.pre_acts(x)).float(), ref, rtol=1e-2, atol=1e-2)


def test_cfg_json_holding_a_list_is_one_error_in_the_library(tmp_path):
    from diffusion_sae.sae import SAEConfig, TopKSAE
    from diffusion_sae.sae.io import load_sae
    from diffusion_sae.sae.model import SAEError

    folder = tmp_path / "sae"
    TopKSAE(cfg=SAEConfig(d_in=8, num_latents=16, k=2), seed=0).save_pretrained(folder)
    (folder / "cfg.json").write_text("[1, 2, 3]")
    with pytest.raises(SAEError, match="expected a JSON object"):
        load_sae(folder)
