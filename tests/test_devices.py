"""Device / dtype / offload resolution, and SAE interventions on half-precision pipelines.

The bf16 tests run every tiny family in bfloat16 with a float32 SAE (the SAE maths runs in fp32
inside the hooks, models/devices.py + sae/model.py) and compare with the same pipeline in float32.
Measured on the tiny pipelines (2 steps, 32x32, CPU): mean |bf16 - fp32| per pixel 0.002-0.006 for
plain, steered and unlearned images, except SD3 unlearning (0.019: bf16 moves a few latents across
the top-k / firing bar); the intervention's own effect is 0.1-0.55 (max pixel change).
"""
import pytest
import torch

from diffusion_sae.models import devices
from diffusion_sae.models.devices import DeviceError, default_dtype, resolve_device, resolve_placement

TEXT = "text_encoder.text_model.encoder.layers.9"
BLOCK = {"sd": "unet.up_blocks.1.attentions.1", "sdxl": "unet.up_blocks.0.attentions.1",
         "sd3": "transformer.transformer_blocks.1", "flux": "transformer.single_transformer_blocks.0"}
# Mean absolute pixel difference bf16 vs fp32 (images in [0, 1]) allowed for plain / steered / unlearned.
MEAN_TOL = {"plain": 0.01, "steer": 0.01, "unlearn": 0.03}


# ------------------------------------------------------------------------------------------ resolver
def test_auto_device_order_and_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_auto_dtype_per_family(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [default_dtype(cuda, f) for f in ("sd", "sdxl", "sd3", "flux")] == \
        [torch.float16, torch.float16, torch.bfloat16, torch.bfloat16]
    assert all(default_dtype(cpu, f) == torch.float32 for f in ("sd", "sdxl", "sd3", "flux", None))
    assert default_dtype(torch.device("mps"), "sdxl") == torch.float16
    assert devices.family_of("StableDiffusionXLPipeline") == "sdxl"
    assert devices.family_of("StableDiffusion3Pipeline") == "sd3"
    assert devices.family_of("FluxPipeline") == "flux"
    assert devices.family_of("StableDiffusionPipeline") == "sd"
    assert devices.family_of("tiny:flux") == "flux"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bad_choices_are_one_line():
    with pytest.raises(DeviceError, match="CUDA is not available") as e:
        resolve_placement("cuda", "auto", "none")
    assert "\n" not in str(e.value)
    with pytest.raises(DeviceError, match="device is cpu"):
        resolve_placement("cpu", "auto", "model")
    with pytest.raises(DeviceError, match="use none, model or sequential"):
        resolve_placement("cpu", "auto", "disk")
    with pytest.raises(DeviceError, match="unknown"):
        resolve_placement("cpu", "int8", "none")
    # A dtype the device cannot compute in (the meta device computes nothing): one line, not a traceback.
    with pytest.raises(DeviceError, match="cannot run on meta") as e:
        devices.check_dtype(torch.device("meta"), torch.bfloat16)
    assert "\n" not in str(e.value)


def test_load_pipeline_places_and_casts():
    from diffusion_sae.models.loading import load_pipeline

    pipe = load_pipeline("tiny:flux", device="cpu", dtype="bf16")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder_2.dtype == torch.bfloat16
    assert pipe.transformer.device.type == "cpu"
    if not torch.cuda.is_available():
        auto = load_pipeline("tiny:sd", device="auto", dtype="auto")
        assert auto.unet.dtype == torch.float32 and auto.unet.device.type == "cpu"


# ------------------------------------------------------------------------------------------ bf16 hooks
def _gen(pipe, prompt="a cat"):
    g = 3.5 if "Flux" in type(pipe).__name__ else 5.0
    return pipe(prompt, num_inference_steps=2, guidance_scale=g, generator=torch.Generator().manual_seed(0),
                output_type="pt", height=32, width=32).images.float().cpu()


@pytest.mark.parametrize("fam", ["sd", "sdxl", "sd3", "flux"])
def test_steer_and_unlearn_in_bf16_match_fp32(fam):
    from diffusion_sae.concepts.dictionary import build_concept_dictionary
    from diffusion_sae.interventions.ablate import unlearn_concepts
    from diffusion_sae.interventions.steer import concept_steering, steer_text_encoder
    from diffusion_sae.models import resolve_hookpoint
    from diffusion_sae.models.loading import load_pipeline
    from diffusion_sae.sae import TopKSAE

    out, d = {}, None
    for dt in ("float32", "bfloat16"):
        pipe = load_pipeline(f"tiny:{fam}", device="auto", dtype=dt)
        w, bw = resolve_hookpoint(pipe, TEXT).width, resolve_hookpoint(pipe, BLOCK[fam]).width
        tsae, bsae = TopKSAE(w, 4 * w, 8, seed=0), TopKSAE(bw, 8 * bw, 4, seed=1)   # fp32 SAEs
        if d is None:
            d = build_concept_dictionary(pipe, bsae, BLOCK[fam], {"cat": ["a cat"], "dog": ["a dog"]}, steps=2,
                                         guidance=3.5 if fam == "flux" else 5.0, height=32, width=32)
        plain = _gen(pipe)
        with steer_text_encoder(pipe, [concept_steering(tsae, pipe, TEXT, "cat", -2.0)]):
            steered = _gen(pipe)
        with unlearn_concepts(pipe, bsae, d, "cat", multiplier=-30.0, top_n=4):
            unlearned = _gen(pipe)
        assert tsae.dtype == bsae.dtype == torch.float32
        out[dt] = {"plain": plain, "steer": steered, "unlearn": unlearned}
    f, b = out["float32"], out["bfloat16"]
    for kind in ("steer", "unlearn"):
        effect = (f[kind] - f["plain"]).abs().max().item()
        assert effect > 0.02, (fam, kind, effect)          # the intervention does something
        b_effect = (b[kind] - b["plain"]).abs().max().item()
        assert b_effect > 0.02, (fam, kind, b_effect)      # ... in bf16 too
    for kind, tol in MEAN_TOL.items():
        diff = (b[kind] - f[kind]).abs().mean().item()
        assert diff < tol, (fam, kind, diff)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_steer_on_tiny_sdxl_in_bf16_and_cuda_refused(tmp_path):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from diffusion_sae.cli import app
    from diffusion_sae.sae import TopKSAE

    TopKSAE(32, 128, 8, seed=0, hookpoint=TEXT).save_pretrained(tmp_path / "sae")
    args = ["steer", "--model", "tiny:sdxl", "--sae", str(tmp_path / "sae"), "--concept", "cat", "--strength", "-2",
            "--prompt", "a cat", "--steps", "2", "--save-images", str(tmp_path / "imgs")]
    r = CliRunner().invoke(app, args + ["--device", "cpu", "--dtype", "bfloat16"])
    assert r.exit_code == 0, (r.output, r.exception)
    from PIL import Image

    img = Image.open(tmp_path / "imgs" / "0.png")
    assert img.size == (32, 32)
    if not torch.cuda.is_available():
        p = subprocess.run([sys.executable, "-m", "diffusion_sae.cli"] + args + ["--device", "cuda"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2
        assert p.stderr.strip().count("\n") == 0 and "CUDA is not available" in p.stderr, p.stderr


def test_bf16_component_diagnostic_runs_each_component_alone_in_bf16():
    """benchmarks/bf16_components.py, the diagnostic for a GPU stack whose bf16 images part from float32: every
    component of every tiny family runs alone in bf16 inside a float32 pipeline (no dtype error), each within the
    plain tolerance of float32 on this stack, and the whole-bf16 row is the pipeline test's figure."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bf16_components

    for fam in ("sd", "sdxl", "sd3", "flux"):
        rows = bf16_components.diagnose(fam, "cpu")
        assert {"vae", "text_encoder", "all (bf16 pipeline)"} <= set(rows), (fam, rows)
        assert all(isinstance(v, float) and 0 < v < MEAN_TOL["plain"] for v in rows.values()), (fam, rows)
    assert bf16_components.main(["--families", "sd,sdxl,nope"]) == 2
