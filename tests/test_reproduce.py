"""The papers' experiments as one call (eval/reproduce.py) and the image sets behind them (eval/imageset.py),
end to end on the tiny SD pipeline with made-up assets in the real formats: an I2P-style CSV
(prompt, categories, nudity_percentage, evaluation_seed, evaluation_guidance), UnlearnCanvas classifier
stand-ins saved as the release's `{"model_state_dict": timm ViT state dict}`, Q16 vectors as a pickled numpy
array, a TorchScript feature network for FID. Nothing is downloaded; each test takes well under 30 s on one core."""
import csv
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny import tiny

from diffusion_sae.eval import unlearncanvas as UC
from diffusion_sae.eval.imageset import Condition, ImageItem, ImageSetError, generate_image_set, read_index
from diffusion_sae.eval.reproduce import (ReproduceError, SAeUronCanvasConfig, SteerersNudityConfig,
                                          plan_saeuron_unlearncanvas, plan_steerers_nudity, run_saeuron_unlearncanvas,
                                          run_steerers_nudity)

TEXT_HP = "text_encoder.text_model.encoder.layers.9"
PROMPTS = ["a bowl of fruit", "a mountain lake", "a red car on a street", "a portrait of an old man"]


def _i2p_csv(path, prompts=PROMPTS, seeds=None, guidance=7.5):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "categories", "nudity_percentage", "evaluation_seed", "evaluation_guidance"])
        for i, p in enumerate(prompts):
            w.writerow([p, "shocking", 0, (seeds or [10 + j for j in range(len(prompts))])[i], guidance])
    return path


def _fresh_sd():
    tiny("sd")  # skips when the CLIP vocabulary is unavailable
    from diffusion_sae.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd")


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


class ParityDetector:
    """A NudeNet stand-in with NudeNet's interface (detect(path) -> boxes): images of even CSV rows get an
    EXPOSED box scored 0.9, odd rows one scored 0.3, every image a FACE_FEMALE box (not an EXPOSED class)."""

    def __init__(self):
        self.seen = []

    def detect(self, path):
        self.seen.append(path)
        row = int(str(path).rsplit("/", 1)[-1].split(".")[0])
        return [{"class": "BUTTOCKS_EXPOSED", "score": 0.9 if row % 2 == 0 else 0.3, "box": [0, 0, 1, 1]},
                {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]}]


# ---------------------------------------------------------------------------------------------
# image sets
# ---------------------------------------------------------------------------------------------
def test_image_set_generates_each_condition_resumes_and_refuses_other_settings(tmp_path):
    pipe = tiny("sd")
    items = [ImageItem("0", "a cat", 3, 7.5), ImageItem("1", "a dog", 4, 5.0)]
    calls = []

    class Mark:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            calls.append(self.name)

        def __exit__(self, *a):
            return False

    conds = [Condition("original", lambda: Mark("original")), Condition("edited", lambda: Mark("edited"), {"s": 1})]
    res = generate_image_set(pipe, items, tmp_path / "set", conds, steps=2)
    assert res["generated"] == 4 and calls == ["original", "edited"]
    # the image of each item is the pipeline's own output for its prompt, seed (CPU generator) and guidance
    direct = pipe("a dog", num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(4)).images[0]
    assert np.array_equal(_pixels(tmp_path / "set" / "original" / "1.png"), np.asarray(direct, dtype=np.int16))
    rows = list(csv.DictReader(open(tmp_path / "set" / "index.csv", encoding="utf-8")))
    assert [(r["name"], r["condition"], r["file"], r["seed"]) for r in rows] == [
        ("0", "original", "original/0.png", "3"), ("1", "original", "original/1.png", "4"),
        ("0", "edited", "edited/0.png", "3"), ("1", "edited", "edited/1.png", "4")]
    assert read_index(tmp_path / "set")["conditions"] == {"original": {}, "edited": {"s": 1}}
    # resumed: a deleted image is made again, the rest is skipped, and no condition is opened needlessly
    (tmp_path / "set" / "edited" / "0.png").unlink()
    (tmp_path / "set" / "edited" / ".0.tmp.png").write_bytes(b"half")     # a killed write
    calls.clear()
    res = generate_image_set(pipe, items, tmp_path / "set", conds, steps=2)
    assert res["generated"] == 1 and res["skipped"] == 3 and calls == ["edited"]
    assert not (tmp_path / "set" / "edited" / ".0.tmp.png").exists()
    # another strength in the same folder is refused, naming what differs
    with pytest.raises(ImageSetError, match=r"other settings \(s differ\)"):
        generate_image_set(pipe, items, tmp_path / "set", [Condition("edited", lambda: Mark("x"), {"s": 2})], steps=2)
    with pytest.raises(ImageSetError, match="two images named '0'"):
        generate_image_set(pipe, items + items[:1], tmp_path / "other", conds, steps=2)
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------
# Concept Steerers: nudity
# ---------------------------------------------------------------------------------------------
def test_steerers_nudity_trains_steers_scores_with_nudenet_and_resumes(tmp_path):
    pytest.importorskip("nudenet", reason="nudenet (the test extra) is not installed")
    from diffusion_sae.interventions.steer import concept_steering
    from diffusion_sae.sae import load_sae
    from safetensors.torch import load_file

    _fresh_sd()
    csv_path = _i2p_csv(tmp_path / "i2p.csv")
    cfg = SteerersNudityConfig(model="tiny:sd", prompts=csv_path, out=tmp_path / "run", expansion=2, k=4, epochs=2,
                               sae_batch_size=64, steps=2, concept="nude", strength=-4.0)
    plan = plan_steerers_nudity(cfg)
    assert plan["images"] == 8 and plan["estimate"] == "estimate, not measured"
    res = run_steerers_nudity(cfg)
    out = tmp_path / "run"
    assert res["hookpoint"] == TEXT_HP and res["sae"] == f"trained: sae/{TEXT_HP}"
    for cond in ("original", "steered"):
        assert sorted(p.name for p in (out / "images" / cond).glob("*.png")) == ["0.png", "1.png", "2.png", "3.png"]
        # NudeNet's own detector on random-weight images of fruit and lakes: nothing exposed
        asr = res["results"][cond]["nudity_asr"]
        assert asr.value == 0.0 and asr.n == 4 and asr.settings["threshold"] == 0.45
    # the plain images are exactly the model's output for each CSV row's seed and guidance
    pipe = _fresh_sd()
    direct = pipe(PROMPTS[2], num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(12)).images[0]
    assert np.array_equal(_pixels(out / "images" / "original" / "2.png"), np.asarray(direct, dtype=np.int16))
    # steering changed the images, and the saved matrix is the one the trained SAE gives
    diffs = [np.abs(_pixels(out / "images" / "original" / f"{i}.png") - _pixels(out / "images" / "steered" / f"{i}.png")).max()
             for i in range(4)]
    assert max(diffs) > 0
    sae = load_sae(str(out / "sae" / TEXT_HP))
    want = concept_steering(sae, pipe, TEXT_HP, "nude", -4.0).matrix
    torch.testing.assert_close(load_file(str(out / "steering.safetensors"))["matrix"], want.float())
    js = json.loads((out / "report.json").read_text())
    table = js["sections"][0]["tables"][0]["rows"]
    assert [(r["images"], r["nudity ASR"], r["N"]) for r in table] == [("original", 0.0, 4), ("steered", 0.0, 4)]
    assert js["settings"]["plan"]["estimate"] == "estimate, not measured"
    md = (out / "report.md").read_text()
    assert "estimate, not measured" in md and "GPU hours" in md
    assert json.loads((out / "reproduce.json").read_text())["experiment"] == "steerers-nudity"
    # rerun: nothing generated again, same answer; another strength in the same folder is refused
    stamp = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    res2 = run_steerers_nudity(cfg)
    assert res2["images"]["generated"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamp
    with pytest.raises(ImageSetError, match="other settings"):
        run_steerers_nudity(SteerersNudityConfig(**{**cfg.__dict__, "strength": -1.0}))


def test_steerers_nudity_with_given_sae_counts_detections_and_q16(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from diffusion_sae.eval.clip import image_embeddings, load_clip, q16_rate_from_embeddings
    from diffusion_sae.models.clip_bpe import load_clip_tokenizer
    from diffusion_sae.sae import TopKSAE

    _fresh_sd()
    tok = load_clip_tokenizer()
    ccfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       vocab_size=len(tok)),
                      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(ccfg).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    (tmp_path / "prompts.p").write_bytes(pickle.dumps(np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)))
    TopKSAE(32, 64, 4, seed=3, hookpoint=TEXT_HP).save_pretrained(tmp_path / "sae")
    det = ParityDetector()
    cfg = SteerersNudityConfig(model="tiny:sd", prompts=_i2p_csv(tmp_path / "i2p.csv"), out=tmp_path / "run",
                               sae=str(tmp_path / "sae"), steps=2, baseline=False, threshold=0.5,
                               clip=tmp_path / "clip", q16=tmp_path / "prompts.p", batch_size=2)
    res = run_steerers_nudity(cfg, detector=det)
    files = sorted((tmp_path / "run" / "images" / "steered").glob("*.png"))
    assert len(files) == 4 and not (tmp_path / "run" / "images" / "original").exists()
    assert not (tmp_path / "run" / "sae").exists() and res["sae"] == str(tmp_path / "sae")
    asr = res["results"]["steered"]["nudity_asr"]
    assert asr.value == 0.5 and asr.details["flagged"] == ["0.png", "2.png"] and len(det.seen) == 4
    assert asr.details["class_counts"]["BUTTOCKS_EXPOSED"] == 2
    clip = load_clip(tmp_path / "clip")
    emb = image_embeddings(clip, [Image.open(f).convert("RGB") for f in files])
    want = q16_rate_from_embeddings(emb, torch.from_numpy(pickle.loads((tmp_path / "prompts.p").read_bytes())))
    assert res["results"]["steered"]["q16_rate"].value == pytest.approx(want.value)
    js = json.loads((tmp_path / "run" / "report.json").read_text())
    assert js["sections"][0]["tables"][0]["rows"][0]["Q16 rate"] == pytest.approx(want.value)


def test_steerers_bad_inputs_are_one_error_and_write_nothing(tmp_path):
    from diffusion_sae.eval.prompts import PromptSetError
    from diffusion_sae.sae import TopKSAE

    _fresh_sd()
    csv_path = _i2p_csv(tmp_path / "i2p.csv")
    out = tmp_path / "run"
    base = dict(model="tiny:sd", prompts=csv_path, out=out, steps=2)
    det = ParityDetector()
    with pytest.raises(PromptSetError, match="does not exist"):
        run_steerers_nudity(SteerersNudityConfig(**{**base, "prompts": tmp_path / "nope.csv"}), detector=det)
    with pytest.raises(ReproduceError, match="Q16 needs both --clip"):
        run_steerers_nudity(SteerersNudityConfig(**base, q16=tmp_path / "prompts.p"), detector=det)
    with pytest.raises(ReproduceError, match="--steps must be a positive integer"):
        run_steerers_nudity(SteerersNudityConfig(**{**base, "steps": 0}), detector=det)
    TopKSAE(16, 64, 4, seed=3, hookpoint=TEXT_HP).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ReproduceError, match="SAE width 16 != width 32"):
        run_steerers_nudity(SteerersNudityConfig(**base, sae=str(tmp_path / "narrow")), detector=det)
    with pytest.raises(ReproduceError, match="not a text-encoder layer"):
        run_steerers_nudity(SteerersNudityConfig(**base, hookpoint="unet.up_blocks.1.attentions.1"), detector=det)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReproduceError, match="is a file"):
        run_steerers_nudity(SteerersNudityConfig(**{**base, "out": tmp_path / "file"}), detector=det)
    assert not out.exists() and det.seen == []


# ---------------------------------------------------------------------------------------------
# SAeUron: UnlearnCanvas
# ---------------------------------------------------------------------------------------------
def _classifiers(tmp_path, constant: dict | None = None):
    """The release's checkpoint format with a 1-block ViT; `constant` = {kind: label} makes that one always answer label."""
    paths = {}
    for kind, labels in (("style", UC.THEMES), ("object", UC.OBJECTS)):
        torch.manual_seed({"style": 1, "object": 2}[kind])
        m = UC.ViTClassifier(len(labels), img_size=32, patch=16, dim=32, depth=1, heads=4, mlp=64)
        if constant and kind in constant:
            with torch.no_grad():
                m.head.weight.zero_()
                m.head.bias.zero_()
                m.head.bias[labels.index(constant[kind])] = 10.0
        paths[kind] = tmp_path / f"{kind}.pth"
        torch.save({"model_state_dict": m.state_dict()}, paths[kind])
    return paths


SMALL = dict(styles=("Monet", "Cubism", "Pop_Art"), objects=("Cats", "Dogs"), seeds=(188,), steps=4, heads=4)


def test_saeuron_unlearncanvas_trains_tunes_on_its_split_and_scores(tmp_path):
    _fresh_sd()
    clf = _classifiers(tmp_path)
    out = tmp_path / "run"
    cfg = SAeUronCanvasConfig(model="tiny:sd", style_classifier=clf["style"], object_classifier=clf["object"], out=out,
                              task="style", targets=("Monet",), expansion=2, k=4, epochs=2, sae_batch_size=64,
                              tune=True, percentiles=(90.0,), multipliers=(-1.0, -5.0), **SMALL)
    plan = plan_saeuron_unlearncanvas(cfg)
    # 3 styles x 2 objects + 2 unstyled per answer set; the plain model's and Monet's; 2 tuning trials at seed 42
    assert (plan["images_per_answer_set"], plan["evaluation_images"], plan["tuning_images"]) == (8, 16, 16)
    res = run_saeuron_unlearncanvas(cfg)
    assert res["hookpoint"] == "unet.up_blocks.1.attentions.2" and res["sae"].startswith("trained: sae/")
    names = sorted(p.name for p in (out / "images" / "Monet").glob("*.jpg"))
    assert names == sorted(UC.filename(s, o, 188) for s in (None,) + SMALL["styles"] for o in SMALL["objects"])
    # tuning images use the tuning seed only; the choice is the trial with the best (UA + IRA) / 2
    assert {p.name.split("seed")[1] for p in (out / "tuning" / "Monet").rglob("*.jpg")} == {"42.jpg"}
    js = json.loads((out / "report.json").read_text())
    trials = js["sections"][0]["tables"][-1]["rows"]
    assert [(r["percentile"], r["multiplier"]) for r in trials] == [(90.0, -1.0), (90.0, -5.0)]
    best = max(trials, key=lambda r: r["(UA+IRA)/2"])
    assert res["chosen"]["Monet"]["multiplier"] == best["multiplier"]
    assert json.loads((out / "tuning" / "params.json").read_text())["params"]["Monet"]["multiplier"] == best["multiplier"]
    # UA / IRA / CRA recomputed from the saved answer set with the classifiers
    s_clf = UC.load_classifier(clf["style"], "style", heads=4)
    o_clf = UC.load_classifier(clf["object"], "object", heads=4)
    files = sorted((out / "images" / "Monet").glob("*.jpg"))
    parsed = [(f, *UC.parse_filename(f.name)) for f in files]
    styled = [p for p in parsed if p[1] is not None]
    unstyled = [p for p in parsed if p[1] is None]
    want = UC.style_unlearning_scores(UC.classify(s_clf, [Image.open(p[0]) for p in styled], UC.THEMES), [p[1] for p in styled],
                                      UC.classify(o_clf, [Image.open(p[0]) for p in unstyled], UC.OBJECTS),
                                      [p[2] for p in unstyled], "Monet")
    got = res["scores"]["Monet"]
    assert (got.ua, got.ira, got.cra) == pytest.approx((want.ua, want.ira, want.cra))
    row = js["sections"][0]["tables"][0]["rows"][0]
    assert row["target"] == "Monet" and row["UA"] == pytest.approx(want.ua)
    # the plain answer set is the DDIM model's own output; the unlearned one differs from it
    pipe = _fresh_sd()
    from diffusion_sae.eval.generate import set_scheduler

    set_scheduler(pipe, "ddim")
    img = pipe(UC.prompt("Cubism", "Dogs"), num_inference_steps=4, guidance_scale=9.0,
               generator=torch.Generator().manual_seed(188)).images[0]
    img.convert("RGB").save(tmp_path / "direct.jpg", quality=95)
    name = UC.filename("Cubism", "Dogs", 188)
    assert np.array_equal(_pixels(out / "images" / "original" / name), _pixels(tmp_path / "direct.jpg"))
    assert any(np.abs(_pixels(out / "images" / "original" / f.name) - _pixels(f)).max() > 0 for f in files)
    assert "estimate, not measured" in (out / "report.md").read_text()
    # rerun: the SAE, dictionary, tuning and answer sets are all reused
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".jpg", ".safetensors")}
    res2 = run_saeuron_unlearncanvas(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert res2["scores"]["Monet"].ua == got.ua


def _hub_sae(tmp_path, monkeypatch, hookpoint):
    """An SAE in a hand-built, offline huggingface_hub cache as org/saeuron-like/<hookpoint> (nothing downloaded)."""
    from huggingface_hub import constants

    from diffusion_sae.sae import TopKSAE

    rev = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    repo = cache / "models--org--saeuron-like"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    TopKSAE(64, 128, 4, seed=5, hookpoint=hookpoint).save_pretrained(repo / "snapshots" / rev / hookpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


class _TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def test_saeuron_object_task_with_hub_sae_exact_scores_and_fid(tmp_path, monkeypatch):
    _fresh_sd()
    hp = "unet.up_blocks.1.attentions.1"
    _hub_sae(tmp_path, monkeypatch, hp)
    # classifiers that always answer Cats / Monet: UA = 1 - acc(Cats) = 0, IRA = acc(Dogs) = 0,
    # CRA = mean over the styled images' styles of acc_S = (1 + 0) / 2
    clf = _classifiers(tmp_path, constant={"style": "Monet", "object": "Cats"})
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    torch.jit.script(_TinyFeatures()).save(str(tmp_path / "inc.pt"))
    cfg = SAeUronCanvasConfig(model="tiny:sd", style_classifier=clf["style"], object_classifier=clf["object"],
                              out=tmp_path / "run", task="object", targets=("Cats",), sae=f"org/saeuron-like/{hp}",
                              original=False, fid_reference=ref, inception=str(tmp_path / "inc.pt"), fid_size=32,
                              styles=("Monet", "Cubism"), objects=("Cats", "Dogs"), seeds=(188,), steps=3, heads=4,
                              tune=False, percentile=90.0, multiplier=-2.0)
    res = run_saeuron_unlearncanvas(cfg)
    s = res["scores"]["Cats"]
    assert (s.ua, s.ira, s.cra) == (0.0, 0.0, 0.5) and (s.n_target, s.n_ira, s.n_cra) == (3, 3, 4)
    assert res["chosen"] == {"Cats": {"percentile": 90.0, "multiplier": -2.0}} and res["hookpoint"] == hp
    assert not (tmp_path / "run" / "sae").exists() and not (tmp_path / "run" / "tuning").exists()
    assert res["fid"]["Cats"].value > 0 and res["fid"]["Cats"].settings["n_generated"] == 6
    row = json.loads((tmp_path / "run" / "report.json").read_text())["sections"][0]["tables"][0]["rows"][0]
    assert row["FID"] == pytest.approx(res["fid"]["Cats"].value)


def test_saeuron_bad_inputs_are_one_error_and_write_nothing(tmp_path):
    from diffusion_sae.eval.metrics import AssetError

    clf = _classifiers(tmp_path)
    out = tmp_path / "run"
    base = dict(model="tiny:sd", style_classifier=clf["style"], object_classifier=clf["object"], out=out, **SMALL)
    cases = [({"tune_seeds": (188,), "tune": True}, "evaluation and tuning seeds overlap"),
             ({"styles": ("Monet", "Rembrandt")}, "unknown UnlearnCanvas style 'Rembrandt'"),
             ({"targets": ("Ukiyoe",)}, "--target 'Ukiyoe' is not among the evaluated styles"),
             ({"styles": ("Monet",)}, "at least two styles"),
             ({"task": "colour"}, "--task must be style or object"),
             ({"fid_reference": tmp_path / "none"}, "--fid-reference"),
             ({"percentiles": (100.0,), "tune": True}, "strictly between 0 and 100")]
    for change, msg in cases:
        with pytest.raises(ReproduceError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            run_saeuron_unlearncanvas(SAeUronCanvasConfig(**{**base, **change}))
    with pytest.raises(AssetError, match="style50.pth"):
        run_saeuron_unlearncanvas(SAeUronCanvasConfig(**{**base, "style_classifier": tmp_path / "nope.pth"}))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------------------------
def _bad(code, err, pattern):
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert pattern in err, err


def test_reproduce_steerers_command_plans_runs_and_refuses_bad_input(tmp_path, capsys):
    from _cli import run_main

    _fresh_sd()
    csv_path = _i2p_csv(tmp_path / "i2p.csv")
    capsys.readouterr()
    code, out, err = run_main(["reproduce", "steerers-nudity", "--model", "tiny:sd", "--prompts", csv_path,
                               "--out", tmp_path / "plan", "--plan"], capsys)
    assert code == 0, err
    assert "4 prompts x 2 (plain and steered) = 8 images at 50 steps" in out and "estimate, not measured" in out
    assert not (tmp_path / "plan").exists()
    from diffusion_sae.sae import TopKSAE

    TopKSAE(32, 64, 4, seed=3, hookpoint=TEXT_HP).save_pretrained(tmp_path / "sae")
    common = ["--threshold", "0.5", "--steps", "2", "--no-baseline", "--device", "cpu"]
    _bad(*run_main(["reproduce", "steerers-nudity", "--model", "tiny:sd", "--prompts", tmp_path / "nope.csv",
                    "--out", tmp_path / "r"], capsys)[::2], "nope.csv does not exist")
    _bad(*run_main(["reproduce", "steerers-nudity", "--model", "tiny:sd", "--prompts", csv_path, "--out", tmp_path / "r",
                    "--clip", tmp_path], capsys)[::2], "Q16 needs both --clip")
    _bad(*run_main(["reproduce", "steerers-nudity", "--model", "tiny:sd", "--prompts", csv_path, "--out", tmp_path / "r",
                    "--device", "cuda:7"], capsys)[::2], "--device cuda:7")
    pytest.importorskip("nudenet", reason="nudenet (the test extra) is not installed")
    _bad(*run_main(["reproduce", "steerers-nudity", "--model", "tiny:sd", "--prompts", csv_path, "--out", tmp_path / "r",
                    "--sae", "org/not-cached", *common], capsys)[::2], "org/not-cached")
    assert not (tmp_path / "r").exists()
    code, out, err = run_main(["reproduce", "steerers-nudity", "--model", "tiny:sd", "--prompts", csv_path,
                               "--out", tmp_path / "run", "--sae", tmp_path / "sae", *common], capsys)
    assert code == 0, err
    assert "steered    nudity_asr     0.0000   (N=4)" in out and "report:" in out
    assert sorted(p.name for p in (tmp_path / "run" / "images" / "steered").glob("*.png")) == [f"{i}.png" for i in range(4)]


def test_reproduce_saeuron_command_with_classifier_folder(tmp_path, capsys):
    from _cli import run_main

    _fresh_sd()
    clf = _classifiers(tmp_path)
    folder = tmp_path / "classifiers"
    folder.mkdir()
    clf["style"].rename(folder / "style50.pth")
    clf["object"].rename(folder / "style50_cls.pth")
    args = ["reproduce", "saeuron-unlearncanvas", "--model", "tiny:sd", "--classifiers", folder, "--heads", "4",
            "--styles", "Monet,Cubism", "--objects", "Cats,Dogs", "--seeds", "188", "--steps", "3",
            "--target", "Monet", "--expansion", "2", "--k", "4", "--epochs", "1", "--sae-batch-size", "32",
            "--percentile", "90", "--no-original"]
    capsys.readouterr()
    code, out, err = run_main([*args, "--out", tmp_path / "plan", "--plan"], capsys)
    assert code == 0, err
    assert "1 style target(s): 6 answer-set images (6 each), 0 tuning images" in out and "estimate, not measured" in out
    assert not (tmp_path / "plan").exists()
    _bad(*run_main([*args, "--out", tmp_path / "r", "--seeds", "188,x"], capsys)[::2], "--seeds must be comma-separated integers")
    _bad(*run_main([*args, "--out", tmp_path / "r", "--dictionary-seeds", "188"], capsys)[::2],
         "evaluation and dictionary seeds overlap")
    _bad(*run_main([*args, "--out", tmp_path / "r", "--classifiers", tmp_path / "none"], capsys)[::2], "--classifiers")
    assert not (tmp_path / "r").exists()
    code, out, err = run_main([*args, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("Monet "))
    assert "UA " in line and "(percentile 90, γ -1)" in line
    assert len(list((tmp_path / "run" / "images" / "Monet").glob("*.jpg"))) == 6


def test_unlearn_save_images_writes_an_indexed_resumable_image_set(tmp_path, capsys):
    from _cli import run_main

    from diffusion_sae.concepts.dictionary import build_concept_dictionary
    from diffusion_sae.sae import TopKSAE

    pipe = _fresh_sd()
    hp = "unet.up_blocks.1.attentions.1"
    sae = TopKSAE(64, 128, 4, seed=5, hookpoint=hp)
    sae.save_pretrained(tmp_path / "sae")
    build_concept_dictionary(pipe, sae, hp, {"cat": ["a cat", "a small cat"], "dog": ["a dog", "a big dog"]},
                             steps=2).save(tmp_path / "sae")
    prompts = _i2p_csv(tmp_path / "p.csv", ["a cat on a sofa", "a dog in the snow"], seeds=[7, 8], guidance=6.0)
    args = ["unlearn", "--model", "tiny:sd", "--sae", tmp_path / "sae", "--concept", "cat", "--prompts", prompts,
            "--steps", "2", "--top-n", "8", "--device", "cpu", "--multiplier"]
    (tmp_path / "file").write_text("x")
    capsys.readouterr()  # what building the assets printed
    _bad(*run_main([*args, "-20", "--save-images", tmp_path / "file"], capsys)[::2], "is a file")
    code, out, err = run_main([*args, "-20", "--save-images", tmp_path / "set"], capsys)
    assert code == 0, err
    assert "(4 new)" in out and "grid" not in out
    s = tmp_path / "set"
    rows = list(csv.DictReader(open(s / "index.csv", encoding="utf-8")))
    assert [(r["file"], r["prompt"], r["seed"], r["guidance"]) for r in rows] == [
        ("original/0.png", "a cat on a sofa", "7", "6.0"), ("original/1.png", "a dog in the snow", "8", "6.0"),
        ("unlearned/0.png", "a cat on a sofa", "7", "6.0"), ("unlearned/1.png", "a dog in the snow", "8", "6.0")]
    direct = pipe("a dog in the snow", num_inference_steps=2, guidance_scale=6.0,
                  generator=torch.Generator().manual_seed(8)).images[0]
    assert np.array_equal(_pixels(s / "original" / "1.png"), np.asarray(direct, dtype=np.int16))
    assert np.abs(_pixels(s / "original" / "0.png") - _pixels(s / "unlearned" / "0.png")).max() > 0
    settings = json.loads((s / "unlearned" / ".settings.json").read_text())
    assert settings["concepts"] == ["cat"] and settings["multiplier"] == -20.0 and settings["top_n"] == 8
    # resumed with a grid as well: nothing generated again; another γ into the same folder is refused
    code, out, err = run_main([*args, "-20", "--save-images", s, "--out", tmp_path / "grid.png"], capsys)
    assert code == 0, err
    assert "(0 new)" in out and (tmp_path / "grid.png").stat().st_size > 1000
    code, _, err = run_main([*args, "-1", "--save-images", s], capsys)
    _bad(code, err, "other settings (multiplier differ)")


def test_dashboard_export_takes_device_dtype_and_refuses_a_missing_device(tmp_path, capsys):
    from _cli import run_main

    args = ["dashboard", "export", "--n-features", "2", "--per-concept", "1", "--stats-steps", "2"]
    if not torch.cuda.is_available():
        _bad(*run_main([*args, "--out", tmp_path / "gpu", "--device", "cuda"], capsys)[::2], "--device cuda")
        assert not (tmp_path / "gpu").exists()
    code, out, err = run_main([*args, "--out", tmp_path / "dash", "--device", "cpu", "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    feats = json.loads((tmp_path / "dash" / "features.json").read_text())
    assert (tmp_path / "dash" / "index.html").is_file() and len(feats["features"]) == 2
