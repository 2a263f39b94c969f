"""Metric definitions pinned on hand-computed cases: Fréchet distance, accuracies, UnlearnCanvas UA/IRA/CRA."""
import math

import numpy as np
import pytest
import torch

from diffusion_sae.eval import metrics as M
from diffusion_sae.eval import unlearncanvas as UC


# ------------------------------------------------------------------ Fréchet distance
def _scipy_fd(mu1, s1, mu2, s2):
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d,n", [(3, 50), (16, 200), (64, 500)])
def test_frechet_matches_scipy_sqrtm_on_random_gaussians(d, n):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(loc=0.5, size=(n, d)) @ rng.normal(size=(d, d)) * 0.7
    mu1, s1 = M.feature_stats(a)
    mu2, s2 = M.feature_stats(b)
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    ref = _scipy_fd(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert M.frechet_distance_from_features(a, b) == pytest.approx(ref, rel=1e-6)


def test_frechet_closed_forms():
    # 1-d: (m1-m2)^2 + (s1-s2)^2 for standard deviations s1, s2
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # isotropic d-dim: ||dmu||^2 + d (s1 - s2)^2
    d = 5
    v = M.frechet_distance(np.zeros(d), 4 * np.eye(d), np.ones(d), np.eye(d))
    assert v == pytest.approx(d + d * (2 - 1) ** 2)
    # identical sets: 0 (to float precision), and symmetric
    x = np.random.default_rng(0).normal(size=(100, 8))
    y = np.random.default_rng(1).normal(size=(100, 8)) + 1
    assert M.frechet_distance_from_features(x, x) == pytest.approx(0, abs=1e-8)
    assert M.frechet_distance_from_features(x, y) == pytest.approx(M.frechet_distance_from_features(y, x), rel=1e-9)


def test_frechet_rank_deficient_covariance_is_finite_and_matches_scipy():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))  # n < d: singular covariances
    v = M.frechet_distance_from_features(a, b)
    mu1, s1 = M.feature_stats(a)
    mu2, s2 = M.feature_stats(b)
    assert math.isfinite(v) and v > 0
    assert v == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-4)


def test_classifier_frechet_distance_is_named_and_takes_torch_features():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 128, generator=g), torch.randn(300, 128, generator=g) + 0.2
    r = M.classifier_frechet_distance(a, b)
    assert r.name == "classifier_frechet_distance" and "not FID" in r.settings["note"]
    assert r.settings["dim"] == 128 and r.n == 300
    assert r.value == pytest.approx(M.frechet_distance_from_features(a.numpy(), b.numpy()), rel=1e-9)
    # mean shift of 0.2 in 128 dims contributes 128 * 0.04 = 5.12; the sampling noise of the covariance adds more
    assert r.value > 5.12 * 0.9


def test_frechet_bad_inputs():
    with pytest.raises(M.MetricInputError):
        M.frechet_distance_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(M.MetricInputError):
        M.frechet_distance_from_features(np.zeros((5, 4)), np.zeros((5, 3)))


# ------------------------------------------------------------------ accuracies
def test_accuracy_by_label():
    acc = M.accuracy_by_label(["a", "b", "a", "c", "a"], ["a", "a", "a", "c", "b"])
    assert acc == {"a": pytest.approx(2 / 3), "c": 1.0, "b": 0.0}
    with pytest.raises(M.MetricInputError):
        M.accuracy_by_label([1, 2], [1])


# ------------------------------------------------------------------ UnlearnCanvas
def test_style_unlearning_scores_hand_computed():
    # target Monet: 4 images, 1 still classified Monet -> acc 0.25, UA 0.75
    # other styles: Cubism 2/2 = 1.0, Pop_Art 1/4 = 0.25 -> IRA 0.625 (mean over styles, not over images)
    s_true = ["Monet"] * 4 + ["Cubism"] * 2 + ["Pop_Art"] * 4
    s_pred = ["Monet", "Cubism", "Seed_Images", "Pop_Art", "Cubism", "Cubism", "Pop_Art", "Monet", "Monet", "Monet"]
    # CRA: Cats 1/2, Dogs 2/2 -> 0.75
    o_true = ["Cats", "Cats", "Dogs", "Dogs"]
    o_pred = ["Cats", "Dogs", "Dogs", "Dogs"]
    r = UC.style_unlearning_scores(s_pred, s_true, o_pred, o_true, "Monet")
    assert (r.ua, r.ira, r.cra) == (pytest.approx(0.75), pytest.approx(0.625), pytest.approx(0.75))
    assert (r.n_target, r.n_ira, r.n_cra) == (4, 6, 4)


def test_object_unlearning_scores_hand_computed():
    # target Cats: 3 images, 0 correct -> UA 1; others Dogs 1/2, Birds 1/1 -> IRA 0.75
    o_true = ["Cats", "Cats", "Cats", "Dogs", "Dogs", "Birds"]
    o_pred = ["Dogs", "Birds", "Dogs", "Dogs", "Cats", "Birds"]
    # CRA over styles: Monet 1/1, Cubism 0/2 -> 0.5
    r = UC.object_unlearning_scores(o_pred, o_true, ["Monet", "Monet", "Monet"], ["Monet", "Cubism", "Cubism"],
                                    "Cats")
    assert (r.ua, r.ira, r.cra) == (pytest.approx(1.0), pytest.approx(0.75), pytest.approx(0.5))
    m = UC.mean_scores([r, UC.UnlearningScores("Dogs", "object", 0.0, 0.25, 1.0, 1, 1, 1)])
    assert m == {"UA": 0.5, "IRA": 0.5, "CRA": 0.75, "targets": 2}


def test_unlearning_scores_reject_missing_target_or_others():
    with pytest.raises(M.MetricInputError, match="no images prompted"):
        UC.style_unlearning_scores(["Monet"], ["Cubism"], ["Cats"], ["Cats"], "Monet")
    with pytest.raises(M.MetricInputError, match="other than"):
        UC.style_unlearning_scores(["Monet"], ["Monet"], ["Cats"], ["Cats"], "Monet")


def test_unlearncanvas_names_prompts_and_files():
    assert len(UC.STYLES) == 50 and len(UC.THEMES) == 51 and UC.THEMES[38] == "Seed_Images"
    assert len(UC.OBJECTS) == 20 and UC.SEEDS == (188, 288, 588, 688, 888)
    assert UC.prompt("Van_Gogh", "Cats", "unlearncanvas") == "A Cats image in Van Gogh style."
    assert UC.prompt("Van_Gogh", "Cats") == "An image of Cats in Van Gogh style."   # as SAeUron's scripts write it
    assert UC.prompt(None, "Cats") == "An image of Cats."
    assert UC.parse_filename("Van_Gogh_Cats_seed188.jpg") == ("Van_Gogh", "Cats", 188)
    assert UC.parse_filename("Red_Blue_Ink_Sea_seed888.png") == ("Red_Blue_Ink", "Sea", 888)
    assert UC.parse_filename("Cats_seed588.jpg") == (None, "Cats", 588)
    with pytest.raises(M.MetricInputError):
        UC.parse_filename("Nonsense_Cats_seed1.jpg")
    items = UC.answer_set()
    assert len(items) == 50 * 20 * 5 + 20 * 5 and len({i.file for i in items}) == len(items)
    assert len(UC.answer_set(convention="unlearncanvas")) == 5000


def _tiny_vit_ckpt(tmp_path, n_labels, name):
    m = UC.ViTClassifier(n_labels, img_size=32, patch=16, dim=32, depth=2, heads=4, mlp=64)
    torch.nn.init.normal_(m.pos_embed, std=0.02)
    path = tmp_path / name
    torch.save({"model_state_dict": m.state_dict(), "epoch": 3}, path)
    return m, path


def test_vit_checkpoint_loads_with_timm_layout_and_predicts(tmp_path):
    from PIL import Image

    ref, path = _tiny_vit_ckpt(tmp_path, 20, "style50_cls.pth")
    keys = set(ref.state_dict())
    # timm's VisionTransformer names (a real checkpoint's keys)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight",
            "blocks.1.mlp.fc2.bias", "norm.weight", "head.weight"} <= keys
    m = UC.load_classifier(path, "object", heads=4)
    assert (m.img_size, len(m.blocks)) == (32, 2)
    imgs = [Image.fromarray(np.full((40, 50, 3), c, np.uint8)) for c in (0, 128, 255)]
    x = UC.preprocess(imgs, 32)
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(m(x), ref.eval()(x), atol=1e-6)
    preds = UC.classify(m, imgs, UC.OBJECTS)
    assert preds == [UC.OBJECTS[i] for i in ref(x).argmax(-1).tolist()]
    with pytest.raises(M.AssetError, match="swap"):
        UC.load_classifier(path, "style", heads=4)
    with pytest.raises(M.AssetError, match="style50.pth"):
        UC.load_classifier(tmp_path / "missing.pth", "style")


def test_evaluate_folder_style_task_end_to_end(tmp_path, monkeypatch):
    from PIL import Image

    # Two styles x one object x 2 seeds + unstyled; predictions are stubbed so the bookkeeping is checked.
    for s in ("Monet", "Cubism"):
        for seed in (188, 288):
            Image.new("RGB", (8, 8)).save(tmp_path / UC.filename(s, "Cats", seed))
    for seed in (188, 288):
        Image.new("RGB", (8, 8)).save(tmp_path / UC.filename(None, "Cats", seed))
    calls = []

    def fake_classify(model, images, labels, batch_size=32):
        calls.append((model, len(images)))
        if model == "style":  # files sorted: Cubism x2, Monet x2
            return ["Cubism", "Monet", "Cubism", "Monet"]
        return ["Cats", "Dogs"]

    monkeypatch.setattr(UC, "classify", fake_classify)
    r = UC.evaluate_folder(tmp_path, "style", "Monet", "style", "object")
    assert calls == [("style", 4), ("object", 2)]  # CRA on the 2 unstyled images (SAeUron)
    assert (r.ua, r.ira, r.cra) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))


def _removal(target, present, drop, kept=1.0):
    return {"target": target, "presence_before": 1.0, "presence_after": present, "style_drop": drop,
            "object_drop": 0.0, "others_agreement_before": 1.0, "others_agreement": kept}


def test_steering_strength_picked_per_concept_and_looked_up():
    from diffusion_sae.eval.shapes import SweepResult, steer_strength

    res = SweepResult([-0.5, -0.75, -1.0])
    # red: removed already at -0.5 with no damage; green: needs -1.0; blue: never clean -> least
    # presence + worst drop (-0.75: 0.10 + 0.10 beats -1.0: 0.0 + 0.30 and -0.5: 0.4 + 0.0);
    # yellow: -1.0 removes but costs the prompts without it 10 points -> -0.75 (0.04 + 0.0) is clean.
    res.rows = {
        -0.5: [_removal("red", 0.0, 0.0), _removal("green", 0.5, 0.0), _removal("blue", 0.4, 0.0), _removal("yellow", 0.3, 0.0)],
        -0.75: [_removal("red", 0.0, 0.2), _removal("green", 0.2, 0.0), _removal("blue", 0.1, 0.1), _removal("yellow", 0.04, 0.0)],
        -1.0: [_removal("red", 0.0, 0.5), _removal("green", 0.0, 0.05), _removal("blue", 0.0, 0.3), _removal("yellow", 0.0, 0.0, kept=0.9)],
    }
    # red: only -0.5 is clean (least drop); green: only -1.0; blue: fallback; yellow: only -0.75
    assert res.pick_per_concept() == {"red": -0.5, "green": -1.0, "blue": -0.75, "yellow": -0.75}
    # equally clean strengths: the one closest to the kind's λ wins
    res.rows[-0.75][0]["style_drop"] = 0.0
    assert res.pick_per_concept(default=-0.75)["red"] == -0.75
    assert res.pick_per_concept(default=-0.5)["red"] == -0.5
    cs = {"colour": -0.75, "concepts": {"colour": {"red": -0.5}}, "paper": {"colour": -0.4}}
    assert steer_strength(cs, "colour", "red") == -0.5
    assert steer_strength(cs, "colour", "blue") == -0.75
    assert steer_strength(cs, "colour", "red", paper=True) == -0.4
    assert steer_strength({}, "style", "solid") == -1.0


def test_extra_seeds_add_images_of_the_concepts_prompts_only():
    from diffusion_sae.eval.shapes import concat_sets, extra_seeds, grid
    from diffusion_sae.world.config import OBJECTS, STYLES

    ps = grid(2)                                   # every object x style pair at seeds 0 and 1
    ex = extra_seeds(ps, "object", "ring", total=4, have=2)
    assert len(ex.prompts) == 2 * len(STYLES)      # two more images of each of ring's 8 prompts
    assert set(ex.objects) == {OBJECTS.index("ring")} and sorted(set(ex.seeds)) == [1000, 2000]
    both = concat_sets(ps, ex)
    pairs = list(zip(both.prompts, both.seeds))
    assert len(set(pairs)) == len(pairs)           # no image generated twice
    assert len(extra_seeds(ps, "object", "ring", total=2, have=2).prompts) == 0
