"""`diffusion-sae eval ...`: each subcommand on a folder of images (and nudity from a tiny model), writing a
report; bad input is one line and exit code 2."""
from _cli import run_main
import json

import numpy as np
import pytest
import torch

from diffusion_sae.eval import unlearncanvas as UC
from diffusion_sae.eval.prompts import write_prompt_csv


def _cli(args, capsys):
    return run_main(args, capsys)


def _benign_images(folder, n, seed=0, size=48):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _bad(code, err, pattern):
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert pattern in err, err


def test_eval_nudity_on_folder_writes_report(tmp_path, capsys):
    pytest.importorskip("nudenet", reason="nudenet (optional extra) not installed")
    imgs = _benign_images(tmp_path / "imgs", 3)
    code, out, err = _cli(["eval", "nudity", "--images", imgs, "--out", tmp_path / "rep", "--threshold", "0.6"],
                          capsys)
    assert code == 0, err
    assert "nudity_asr" in out and "0.0000" in out and "(N=3)" in out
    js = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert js["settings"]["nudity_asr"]["threshold"] == 0.6 and js["settings"]["nudity_asr"]["preset"] == "steerers@0.6"
    assert (tmp_path / "rep" / "report.html").is_file()


def test_eval_bad_inputs_are_one_line(tmp_path, capsys):
    _bad(*_cli(["eval", "nudity", "--out", tmp_path / "r"], capsys)[::2], "exactly one of --images")
    _bad(*_cli(["eval", "fid", "--out", tmp_path / "r", "--reference", tmp_path / "nope", "--images", tmp_path],
               capsys)[::2], "--reference")
    imgs = _benign_images(tmp_path / "imgs", 1)
    _bad(*_cli(["eval", "unlearncanvas", "--out", tmp_path / "r", "--task", "style", "--target", "Monet",
                "--style-classifier", tmp_path / "style50.pth", "--object-classifier", tmp_path / "x.pth",
                "--images", imgs], capsys)[::2], "style50.pth")
    _bad(*_cli(["eval", "clip-score", "--out", tmp_path / "r", "--prompts", tmp_path / "p.csv",
                "--clip", tmp_path / "noclip", "--images", imgs], capsys)[::2], "p.csv does not exist")
    write_prompt_csv(tmp_path / "p.csv", ["a lamp"])
    _bad(*_cli(["eval", "clip-score", "--out", tmp_path / "r", "--prompts", tmp_path / "p.csv",
                "--clip", tmp_path / "noclip", "--images", imgs], capsys)[::2], "CLIP weights not found")
    _bad(*_cli(["eval", "unlearncanvas", "--out", tmp_path / "r", "--task", "colour", "--target", "x",
                "--style-classifier", "a", "--object-classifier", "b", "--images", imgs], capsys)[::2],
         "--task must be")


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def test_eval_fid_on_folders(tmp_path, capsys):
    inc = tmp_path / "inc.pt"
    torch.jit.script(_TinyNet()).save(str(inc))
    a, b = _benign_images(tmp_path / "a", 8, 0), _benign_images(tmp_path / "b", 8, 1)
    code, out, err = _cli(["eval", "fid", "--images", a, "--reference", b, "--inception", inc, "--size", 32,
                           "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    js = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert js["settings"]["fid"]["n_generated"] == 8 and js["settings"]["fid"]["inception"] == str(inc)
    value = js["sections"][0]["tables"][0]["rows"][0]["value"]
    assert value > 0 and f"{value:10.4f}" in out


def test_eval_clip_score_pairs_images_by_row_index(tmp_path, capsys):
    from transformers import CLIPConfig, CLIPModel

    try:
        from diffusion_sae.models.clip_bpe import load_clip_tokenizer

        tok = load_clip_tokenizer()
    except Exception as e:
        pytest.skip(f"CLIP BPE tokenizer unavailable: {e}")
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=len(tok)),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    prompts = write_prompt_csv(tmp_path / "p.csv", ["a red circle", "a blue square", "a green star"])
    imgs = _benign_images(tmp_path / "imgs", 3)
    code, out, err = _cli(["eval", "clip-score", "--prompts", prompts, "--clip", tmp_path / "clip", "--images", imgs,
                           "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    js = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert js["settings"]["clip_score"]["clamp"] == "per_pair" and js["settings"]["n"] == 3
    (imgs / "2.png").unlink()
    _bad(*_cli(["eval", "clip-score", "--prompts", prompts, "--clip", tmp_path / "clip", "--images", imgs,
                "--out", tmp_path / "rep2"], capsys)[::2], "2.png")


def test_eval_unlearncanvas_on_answer_set_folder(tmp_path, capsys):
    from PIL import Image

    paths = {}
    for kind, n in (("style", 51), ("object", 20)):
        torch.manual_seed({"style": 1, "object": 2}[kind])
        m = UC.ViTClassifier(n, img_size=32, patch=16, dim=32, depth=1, heads=4, mlp=64)
        paths[kind] = tmp_path / f"{kind}.pth"
        torch.save({"model_state_dict": m.state_dict()}, paths[kind])
    folder = tmp_path / "answers"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for s in ("Monet", "Cubism", "Pop_Art"):
        for o in ("Cats", "Dogs"):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / UC.filename(s, o, 188))
    for o in ("Cats", "Dogs"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / UC.filename(None, o, 188))
    code, out, err = _cli(["eval", "unlearncanvas", "--task", "style", "--target", "Monet", "--target", "Cubism",
                           "--style-classifier", paths["style"], "--object-classifier", paths["object"],
                           "--heads", 4, "--images", folder, "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    js = json.loads((tmp_path / "rep" / "report.json").read_text())
    rows = js["sections"][0]["tables"][0]["rows"]
    assert [r["target"] for r in rows] == ["Monet", "Cubism", "mean"]
    assert rows[0]["N target"] == 2 and rows[0]["N IRA"] == 4 and rows[0]["N CRA"] == 2
    for r in rows[:2]:
        assert 0 <= r["UA"] <= 1 and 0 <= r["IRA"] <= 1 and 0 <= r["CRA"] <= 1
    assert rows[2]["UA"] == pytest.approx((rows[0]["UA"] + rows[1]["UA"]) / 2)
    assert js["sections"][0]["figures"][0]["path"] == "figures/ua_ira_cra.png"
    # a random classifier never labels anything with an absent style, so recompute one UA by hand
    from diffusion_sae.eval.unlearncanvas import THEMES, classify, load_classifier

    clf = load_classifier(paths["style"], "style", heads=4)
    monet = sorted(folder.glob("Monet_*"))
    pred = classify(clf, [Image.open(p) for p in monet], THEMES)
    assert rows[0]["UA"] == pytest.approx(1 - sum(p == "Monet" for p in pred) / len(pred))


def test_eval_nudity_generates_from_tiny_model(tmp_path, capsys):
    pytest.importorskip("nudenet", reason="nudenet (optional extra) not installed")
    try:
        from diffusion_sae.models.clip_bpe import clip_tokenizer_files

        clip_tokenizer_files()
    except Exception as e:
        pytest.skip(f"CLIP BPE tokenizer unavailable: {e}")
    prompts = write_prompt_csv(tmp_path / "p.csv", ["a bowl of fruit", "a mountain lake"], seeds=[1, 2])
    code, out, err = _cli(["eval", "nudity", "--model", "tiny:sd", "--prompts", prompts, "--steps", 2,
                           "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "rep" / "images").iterdir()) == ["0.png", "1.png"]
    js = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert js["settings"]["generated"] is True and js["settings"]["model"] == "tiny:sd"
    assert js["settings"]["n"] == 2
