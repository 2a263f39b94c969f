"""The static dashboard: opens offline (no external URL) and shows the explorer's feature content."""
from __future__ import annotations

from _cli import run_main

import json
import re
from html.parser import HTMLParser

import pytest

from diffusion_sae.app.shapescanvas import bundled_engine
from diffusion_sae.app.export import export_dashboard

PROMPTS = ["a red circle in solid style", "a blue star in striped style", "a green heart in dotted style",
           "a yellow ring in wavy style"]


@pytest.fixture(scope="module")
def engine():
    return bundled_engine(stats_prompts=PROMPTS, stats_seeds=[0, 1, 2, 3], stats_steps=3)


class _Refs(HTMLParser):
    """Every URL-bearing attribute (src, href, ...) of a page."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href", "srcset", "action", "poster", "data", "xlink:href") and v is not None:
                self.refs.append((tag, k, v))


def test_export_is_offline_and_matches_explorer(engine, tmp_path):
    stats = engine.stats()
    feats = stats.top_features(3)
    index = export_dashboard(tmp_path / "dash", stats, engine.index(), features=feats)
    out = index.parent
    pages = sorted(out.rglob("*.html"))
    assert {p.name for p in pages} == {"index.html"} | {f"{f}.html" for f in feats}
    for p in pages + [out / "style.css"]:
        text = p.read_text()
        # No reference to any host at all: no http(s) URL, no protocol-relative //host, no @import.
        assert not re.search(r"https?://", text, re.I), p
        assert "@import" not in text and "<script" not in text.lower(), p
        if p.suffix == ".html":
            parser = _Refs()
            parser.feed(text)
            for tag, attr, ref in parser.refs:
                assert not ref.startswith("//"), (p, ref)
                if ref.startswith("data:"):
                    assert ref.startswith("data:image/png;base64,"), (p, tag)
                else:   # a relative link to a file that is in the folder
                    target = (p.parent / ref.split("#")[0]).resolve()
                    assert target.is_file() and target.is_relative_to(out.resolve()), (p, ref)
    # The same feature content as the explorer shows in the browser: the card is verbatim.
    for f in feats:
        assert engine.feature_card(f) in (out / "features" / f"{f}.html").read_text()
    summary = json.loads((out / "features.json").read_text())
    assert [s["feature"] for s in summary["features"]] == feats
    tops = stats.top_images(feats[0], 8)
    assert [t["index"] for t in summary["features"][0]["top_images"]] == [t.index for t in tops]
    assert summary["features"][0]["concepts"][0]["concept"] == engine.index().top_concepts(feats[0])[0].concept


def _cli(args, capsys):
    return run_main(args, capsys)


def test_export_cli(tmp_path, capsys):
    common = ["--per-concept", "1", "--stats-steps", "2"]
    code, out, err = _cli(["dashboard", "export", "--out", tmp_path / "d", "--features", "3,7", *common], capsys)
    assert code == 0, err
    assert (tmp_path / "d" / "features" / "3.html").is_file() and (tmp_path / "d" / "features" / "7.html").is_file()
    code, out, err = _cli(["dashboard", "export", "--out", tmp_path / "e", "--features", "99999", *common], capsys)
    assert code == 2 and not (tmp_path / "e").exists()
    assert err.splitlines()[-1].startswith("error: feature 99999 is out of range")


# --- issue 23: --out never deletes a folder that is not a previous export --------------------
def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def test_export_refuses_a_user_folder_and_replaces_a_previous_export(engine, tmp_path):
    from diffusion_sae.app.export import MARKER, ExportError

    stats = engine.stats()
    user = tmp_path / "thesis"
    (user / "chapter").mkdir(parents=True)
    (user / "chapter" / "draft.tex").write_text("a week of work")
    (tmp_path / "thesis.tmp").mkdir()  # the old code removed <out>.tmp blindly
    (tmp_path / "thesis.tmp" / "keep.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(ExportError, match="not a dashboard export"):
        export_dashboard(user, stats, None, features=[stats.top_features(1)[0]])
    assert _tree(tmp_path) == before
    # a file is refused too
    (tmp_path / "f.html").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_dashboard(tmp_path / "f.html", stats, None, features=[stats.top_features(1)[0]])
    # an empty folder and a previous export are (re)written; nothing else appears beside them
    (tmp_path / "empty").mkdir()
    f = stats.top_features(2)
    export_dashboard(tmp_path / "empty", stats, None, features=f[:1])
    assert (tmp_path / "empty" / MARKER).is_file()
    export_dashboard(tmp_path / "empty", stats, None, features=f[1:2])
    assert sorted(p.name for p in (tmp_path / "empty" / "features").iterdir()) == [f"{f[1]}.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "f.html", "thesis", "thesis.tmp"]
    assert (tmp_path / "thesis.tmp" / "keep.txt").read_text() == "mine"


def test_export_failure_leaves_no_temp_folder_and_keeps_the_old_export(engine, tmp_path, monkeypatch):
    from diffusion_sae.app import export

    stats = engine.stats()
    f = stats.top_features(1)[0]
    export.export_dashboard(tmp_path / "d", stats, None, features=[f])
    old = _tree(tmp_path / "d")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "feature_card", boom)
    with pytest.raises(OSError):
        export.export_dashboard(tmp_path / "d", stats, None, features=[f])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert _tree(tmp_path / "d") == old


def test_export_cli_refuses_a_user_folder_before_any_work(tmp_path, capsys, monkeypatch):
    from diffusion_sae.cli import ui as cli_ui

    user = tmp_path / "results"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    monkeypatch.setattr(cli_ui, "_ui_engine", lambda *a, **k: pytest.fail("computed stats before checking --out"))
    code, out, err = _cli(["dashboard", "export", "--out", user], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: --out") and "not a dashboard export" in err
    assert (user / "notes.txt").read_text() == "keep me" and sorted(tmp_path.iterdir()) == [user]
