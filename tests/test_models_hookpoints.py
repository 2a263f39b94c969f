"""Hookpoint registry, resolution and tensor layouts on tiny random-weight pipelines of all four families."""

import pytest
import torch
from _tiny import tiny

from diffusion_sae.models import (HookpointError, as_tokens, from_tokens, list_hookpoints, output_tensor,
                                  replace_output, resolve_hookpoint)
from diffusion_sae.models.clip_bpe import ClipBpeUnavailable, load_clip_tokenizer

FAMILIES = ["sd", "sdxl", "sd3", "flux"]




def _kw(family, **kw):
    if family == "flux":
        kw.setdefault("max_sequence_length", 16)
    return kw


def test_clip_tokenizer_matches_openai_ids():
    try:
        tok = load_clip_tokenizer()
    except ClipBpeUnavailable as e:
        pytest.skip(str(e))
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_registered_hookpoint_resolves_and_captures_with_its_width(family):
    from diffusion_sae.activations import capture_activations

    pipe = tiny(family)
    names = list_hookpoints(pipe)
    assert names == list_hookpoints(pipe, "text") + list_hookpoints(pipe, "denoiser")
    hps = [resolve_hookpoint(pipe, n) for n in names]
    assert all(h.name == n and isinstance(h.module, torch.nn.Module) for h, n in zip(hps, names))
    with capture_activations(pipe, hps, branches=("cond",)) as cap:
        pipe("a photo of a cat", **_kw(family, num_inference_steps=1, height=32, width=48, output_type="latent"))
    seen = {}
    for r in cap.records:
        seen.setdefault(r.hookpoint, r)
    assert set(seen) == set(names), set(names) - set(seen)
    for h in hps:
        r = seen[h.name]
        assert r.activations.shape[-1] == h.width, h.name
        if r.grid is not None:  # a 4-D UNet map: tokens = H*W with the image's 2:3 aspect ratio
            assert r.activations.shape[1] == r.grid[0] * r.grid[1] and 3 * r.grid[0] == 2 * r.grid[1]


def test_registry_has_the_published_hookpoints():
    assert "text_encoder.text_model.encoder.layers.9" in list_hookpoints(tiny("sd"))          # Steerers SD 1.4
    assert "unet.up_blocks.1.attentions.1" in list_hookpoints(tiny("sd"))                      # SAeUron objects
    assert "unet.up_blocks.1.attentions.2" in list_hookpoints(tiny("sd"))                      # SAeUron styles
    sdxl = list_hookpoints(tiny("sdxl"))
    assert "text_encoder.text_model.encoder.layers.10" in sdxl and "text_encoder_2.text_model.encoder.layers.28" in sdxl
    assert "text_encoder_2.encoder.block.22" in list_hookpoints(tiny("flux"))                   # Steerers FLUX T5
    assert "transformer.single_transformer_blocks.0" in list_hookpoints(tiny("flux"))
    assert "text_encoder_3.encoder.block.3" in list_hookpoints(tiny("sd3"))
    # SD 1.4 structure: cross-attention in down 0-2 (2 each), mid, up 1-3 (3 each).
    unet = list_hookpoints(tiny("sd"), "denoiser")
    assert len(unet) == 3 * 2 + 1 + 3 * 3 and not any(n.startswith("unet.up_blocks.0.") for n in unet)


def test_resolution_modes_aliases_and_kinds():
    pipe = tiny("sd")
    hp = resolve_hookpoint(pipe, "unet.up_blocks.1.attentions.1:update")
    assert (hp.read, hp.kind, hp.component, hp.path) == ("update", "denoiser", "unet", "unet.up_blocks.1.attentions.1")
    assert hp.module is pipe.unet.up_blocks[1].attentions[1] and hp.width == 64
    # transformers 5 has no `.text_model`; the module path without it names the same layer.
    a = resolve_hookpoint(pipe, "text_encoder.encoder.layers.3")
    assert a.name == "text_encoder.text_model.encoder.layers.3" and a.kind == "text" and a.width == 32
    assert a.module is resolve_hookpoint(pipe, "text_encoder.text_model.encoder.layers.3").module


def test_unknown_hookpoint_lists_closest_names():
    pipe = tiny("sd")
    with pytest.raises(HookpointError, match=r"closest valid names: unet\.up_blocks\.1\.attentions\.1"):
        resolve_hookpoint(pipe, "unet.up_blocks.1.attention.1")
    with pytest.raises(HookpointError, match="unknown hookpoint"):
        resolve_hookpoint(pipe, "unet.up_blocks.9.attentions.0")
    with pytest.raises(HookpointError, match="read mode"):
        resolve_hookpoint(pipe, "unet.up_blocks.1.attentions.1:delta")
    assert issubclass(HookpointError, ValueError)


def test_output_layouts():
    class FluxTransformerBlock(torch.nn.Module):  # name-matched like the real dual-stream block
        pass

    text, img = torch.randn(2, 5, 4), torch.randn(2, 7, 4)
    assert output_tensor((text, img), FluxTransformerBlock()) is img
    new = torch.zeros_like(img)
    out = replace_output((text, img), new, FluxTransformerBlock())
    assert out[0] is text and out[1] is new
    t5 = (torch.randn(1, 3, 4), torch.randn(1, 2, 3, 3))
    assert output_tensor(t5, torch.nn.Identity()) is t5[0]
    x = torch.randn(2, 3, 4, 6)
    tok, grid = as_tokens(x)
    assert tok.shape == (2, 24, 3) and grid == (4, 6)
    assert torch.equal(tok[1, 1 * 6 + 2], x[1, :, 1, 2])  # row-major over (h, w)
    assert torch.equal(from_tokens(tok, grid), x)
    with pytest.raises(HookpointError, match="2-D"):
        as_tokens(torch.randn(2, 8), "unet.time_embedding")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipelines_generate_square_and_non_square_and_seeded(family):
    pipe = tiny(family)
    for h, w in [(32, 32), (32, 48)]:
        img = pipe("a red circle", **_kw(family, num_inference_steps=4, height=h, width=w, output_type="pt",
                                         generator=torch.Generator().manual_seed(1))).images
        assert img.shape == (1, 3, h, w) and torch.isfinite(img).all()
    from diffusion_sae.models.tiny import build_tiny_pipeline
    again, other = build_tiny_pipeline(family, seed=0), build_tiny_pipeline(family, seed=1)
    den = "unet" if family in ("sd", "sdxl") else "transformer"
    a = torch.cat([p.flatten() for p in getattr(pipe, den).parameters()])
    assert torch.equal(a, torch.cat([p.flatten() for p in getattr(again, den).parameters()]))
    assert not torch.equal(a, torch.cat([p.flatten() for p in getattr(other, den).parameters()]))


def test_registry_hooks_stack_by_name_and_leave_the_module_as_it_was():
    from diffusion_sae.models import Hookpoint, register_edit, registered

    torch.manual_seed(0)
    m, x = torch.nn.Linear(3, 3), torch.randn(2, 3)
    y = m(x).detach()
    hp = Hookpoint("m", "m", m, "unet", "denoiser", "output", 3)
    double = register_edit(hp, lambda t: 2 * t, "double")
    shift = register_edit(hp, lambda t: t + 1, "shift")
    assert [n.split("#")[0] for n in registered(m)] == ["double", "shift"]
    assert torch.allclose(m(x), 2 * y + 1, atol=1e-6)      # the later hook edits what the earlier one returned
    double.remove()                                         # by name, from under the newer one
    assert torch.allclose(m(x), y + 1, atol=1e-6)
    shift.remove()
    assert registered(m) == {} and "forward" not in m.__dict__ and torch.equal(m(x), y)


def test_clip_bpe_unreachable_is_one_clear_line(tmp_path, monkeypatch):
    """No package index and no cached copy (a GPU machine cut off from the internet): a DiffusionSAEError (the CLI
    prints it as one line, exit 2) that names the cache folder and DIFFUSION_SAE_CACHE, and nothing is left behind."""
    import subprocess

    from diffusion_sae.errors import DiffusionSAEError
    from diffusion_sae.models import clip_bpe

    def offline(cmd, **kw):
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution found for open-clip-torch")
    monkeypatch.setattr(clip_bpe.subprocess, "run", offline)
    with pytest.raises(DiffusionSAEError) as e:
        clip_bpe.clip_tokenizer_files(tmp_path / "clip-bpe")
    msg = str(e.value)
    assert "\n" not in msg and "No matching distribution" in msg and "DIFFUSION_SAE_CACHE" in msg
    assert str(tmp_path / "clip-bpe") in msg
    assert list((tmp_path / "clip-bpe").iterdir()) == []
