"""The web UI in a real browser (Playwright + Debian's Chromium) on the bundled model.

Generate, drag a strength slider and see the result image change, search a concept, open a feature
and see its heatmaps, send it to the steering panel; a screenshot goes to test-artifacts/.
Skips only when no Chromium binary can be found (`make test` installs it when run as root).
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = os.environ.get("DIFFUSION_SAE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason=f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium` "
                                       "(make test does this when run as root)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    from diffusion_sae.app.shapescanvas import bundled_engine
    from diffusion_sae.app.ui import launch

    prompts = ["a red circle in solid style", "a blue star in striped style", "a green heart in dotted style",
               "a yellow ring in wavy style", "a purple square in checkered style", "an orange arrow in noisy style"]
    engine = bundled_engine(stats_prompts=prompts, stats_seeds=list(range(len(prompts))), stats_steps=5)
    demo, url = launch(engine, host="127.0.0.1", port=_free_port(), block=False)
    try:
        yield engine, url
    finally:
        demo.close()


def _pixels(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(np.int16)


def test_browser_generate_slider_feature(served):
    from playwright.sync_api import sync_playwright

    engine, url = served
    assert url.startswith("http://127.0.0.1:")
    feature = engine.stats().top_features(1)[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                    viewport={"width": 1280, "height": 1400})
        try:
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            page.locator("#generate").wait_for()

            # 1. A concept with strength 0: the result is the original.
            page.locator("#target-0 textarea, #target-0 input").first.fill("red")
            page.locator("#generate").click()
            result = page.locator("#result img")
            result.wait_for()
            page.locator("#original img").wait_for()
            first_src = result.get_attribute("src")
            before = _pixels(result)
            assert np.abs(before - _pixels(page.locator("#original img"))).mean() < 1.0

            # 2. Drag the strength slider towards -3 (removes "red"): the result image changes.
            rng = page.locator("#strength-0 input[type=range]")
            box = rng.bounding_box()
            page.mouse.click(box["x"] + 0.1 * box["width"], box["y"] + box["height"] / 2)
            value = float(page.locator("#strength-0 input[type=number]").input_value())
            assert value < -1.5, value
            page.locator("#generate").click()
            page.wait_for_function("src => { const i = document.querySelector('#result img');"
                                   " return i && i.src && i.src !== src && i.complete; }", arg=first_src)
            page.wait_for_timeout(300)
            after = _pixels(page.locator("#result img"))
            assert np.abs(after - before).mean() > 2.0, "moving the strength slider did not change the image"
            assert "done" in page.locator("#status").inner_text()

            # 3. Search a concept, open a feature: its top images come with heatmaps.
            page.locator("#concept-query textarea, #concept-query input").first.fill("red")
            page.locator("#search").click()
            page.locator('#search-results .search-results[data-concept="red"]').wait_for()
            page.locator("#feature input[type=number]").fill(str(feature))
            page.locator("#show-feature").click()
            card = page.locator(f'#feature-card .feature-card[data-feature="{feature}"]')
            card.wait_for()
            heat = card.locator("img.heatmap")
            assert heat.count() >= 1
            assert heat.first.evaluate("i => i.complete && i.naturalWidth") == 128
            assert card.locator("svg.step-plot polyline").count() >= 1

            # 4. Send it to the steering panel.
            page.locator("#send-to-steering").click()
            page.wait_for_function("f => { const t = document.querySelector('#target-0 textarea, #target-0 input');"
                                   " return t && t.value === '#' + f; }", arg=str(feature))
            # 5. An out-of-range index is one error line, the card stays.
            page.locator("#feature input[type=number]").fill("999999")
            page.locator("#show-feature").click()
            page.get_by_text("out of range").wait_for()
            assert card.count() == 1

            # 6. The dashboard export offers a zip download.
            page.locator("#export").click()
            page.locator("#dashboard-file a").first.wait_for()
            assert ".zip" in page.locator("#dashboard-file").inner_text()
            page.screenshot(path=str(ARTIFACTS / "app_browser.png"), full_page=True)
        finally:
            ctx.close()
    assert (ARTIFACTS / "app_browser.png").stat().st_size > 10_000


def test_exported_dashboard_opens_offline_in_the_browser(served, tmp_path):
    """file:// pages, every non-file request blocked and recorded: none is made, every image decodes."""
    from playwright.sync_api import sync_playwright

    from diffusion_sae.app.export import export_dashboard

    engine, _ = served
    feats = engine.stats().top_features(2)
    index = export_dashboard(tmp_path / "dash", engine.stats(), engine.index(), features=feats)
    outside = []
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                      else (outside.append(route.request.url), route.abort()))
            page = ctx.new_page()
            page.goto(index.as_uri())
            assert page.locator(".feature-row").count() == len(feats)
            page.locator(f'a[href="features/{feats[0]}.html"]').first.click()
            page.wait_for_url(f"**/features/{feats[0]}.html")
            card = page.locator(f'.feature-card[data-feature="{feats[0]}"]')
            assert card.locator("img.heatmap").count() >= 1
            sizes = page.eval_on_selector_all("img", "els => els.map(i => i.complete && i.naturalWidth)")
            assert sizes and all(s == 128 for s in sizes), sizes
            # the stylesheet came along (relative link): its pixelated rendering applies
            assert card.locator("img.heatmap").first.evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"
            page.screenshot(path=str(ARTIFACTS / "dashboard_feature.png"), full_page=True)
        finally:
            ctx.close()
    assert outside == []


def test_quick_slider_moves_show_the_last_value(served, monkeypatch):
    """Issue 23: after quick drags and arrow keys the result shown is the one the slider reads (the
    UI used to drop events while a run was busy and to ignore the keyboard), labelled with the
    settings that made it, and identical to the engine's image for those settings."""
    from playwright.sync_api import sync_playwright

    from diffusion_sae.app.engine import METHODS, Edit
    from diffusion_sae.app.ui import _show

    engine, url = served
    run = engine.generate

    def slow_generate(*a, **k):  # a busy machine: every slider event arrives while a run is still going
        time.sleep(1.5)
        return run(*a, **k)

    monkeypatch.setattr(engine, "generate", slow_generate)
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                    viewport={"width": 1280, "height": 1400})
        try:
            page = ctx.new_page()
            page.set_default_timeout(120_000)
            page.goto(url)
            page.locator("#generate").wait_for()
            page.locator("#target-0 textarea, #target-0 input").first.fill("red")
            steps = page.locator("#steps input[type=number]")
            steps.fill("4")
            steps.press("Enter")
            rng = page.locator("#strength-0 input[type=range]")
            box = rng.bounding_box()
            for frac in (0.1, 0.8, 0.3, 0.9, 0.15):  # quick clicks: each an input event while runs are busy
                page.mouse.click(box["x"] + frac * box["width"], box["y"] + box["height"] / 2)
                page.wait_for_timeout(60)
            rng.focus()
            for _ in range(3):  # the keyboard changes the value too
                page.keyboard.press("ArrowLeft")
            final = float(page.locator("#strength-0 input[type=number]").input_value())
            assert final < -1.0, final
            want = f"λ={final:g}"
            page.wait_for_function("w => (document.querySelector('#status') || {}).innerText?.includes(w)", arg=want,
                                   timeout=60_000)
            page.wait_for_timeout(4000)  # no stale run may land after it
            assert want in page.locator("#status").inner_text()
            label_ok = want in page.locator("#result-settings").inner_text()
            src = page.locator("#result img").get_attribute("src")
            shown = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
        finally:
            ctx.close()
    _, res = run("a red circle in solid style", 0, 4, [Edit("red", METHODS[0], final)])
    expected = np.asarray(_show(res).convert("RGB"))
    assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 1, "the image shown is not the last value's"
    assert label_ok, "the result is not labelled with the settings that made it"
