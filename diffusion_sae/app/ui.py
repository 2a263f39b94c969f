"""The Gradio app: a thin shell over Engine (generate with edits; feature explorer; export).

Bound to 127.0.0.1 by default. No font or script is fetched from the internet (system fonts, SSR
off, analytics off), so the page works on an offline machine.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

N_EDITS = 3
SHOW = 256   # display size of the 32x32 images (nearest neighbour)


def _show(pixels):
    from PIL import Image

    im = Image.fromarray(pixels)
    return im.resize((SHOW, SHOW * im.height // im.width), Image.NEAREST)


def _err(e: Exception) -> str:
    return f"**error:** {str(e).splitlines()[0] if str(e) else type(e).__name__}"


NONE = "(none)"


def settings_label(prompt, seed, steps, edits, registered=()) -> str:
    """The settings that made a result, as shown beside it (so that a result never passes for another's)."""
    live = [e for e in edits if e.target.strip() and e.strength != 0]
    what = "; ".join([f"{e.target.strip()} ({e.method}, λ={e.strength:g})" for e in live]
                     + [f"{n} ({st.strip() or 'defaults'})" for n, st in registered]) or "no edit"
    return f"{what} · seed {seed} · {steps} steps · {prompt!r}"


def build_app(engine):
    import gradio as gr

    from ..interventions.registry import intervention_names
    from .engine import ERRORS, METHODS, Edit

    concepts = ", ".join(engine.concept_names()) or "(no concept dictionaries loaded)"

    def generate(prompt, seed, steps, *rows):
        *rows, method, method_settings = rows
        edits = [Edit(str(rows[3 * i] or ""), str(rows[3 * i + 1]), float(rows[3 * i + 2] or 0)) for i in range(N_EDITS)]
        registered = [(str(method), str(method_settings or ""))] if method and method != NONE else []
        try:
            orig, res = engine.generate(prompt, int(seed or 0), int(steps), edits, registered)
        except ERRORS as e:
            return gr.update(), gr.update(), _err(e), gr.update()
        # Labelled with the very settings it was made with: after quick slider moves the last run's
        # values are what the image shows, and the label says so.
        label = settings_label(prompt, int(seed or 0), int(steps), edits, registered)
        return _show(orig), _show(res), f"done: {label}", f"Result made with: {label}"

    def show_feature(f, progress=gr.Progress()):
        # The first look computes the statistics (one pass over the prompt set): show how far it is.
        def tick(i, n):
            progress(i / n, desc=f"feature statistics: {i}/{n} images")
        if f is None:
            return gr.update(), "**error:** type a feature index"
        try:
            return engine.feature_card(int(f), progress=tick), ""
        except ERRORS as e:
            return gr.update(), _err(e)

    def search(q):
        try:
            return engine.search(q), ""
        except ERRORS as e:
            return gr.update(), _err(e)

    def send(f):
        if f is None:
            return gr.update(), gr.update(), gr.update(), "**error:** type a feature index"
        try:
            j = engine.check_feature(int(f))
        except ERRORS as e:
            return gr.update(), gr.update(), gr.update(), _err(e)
        return f"#{j}", "block ablation", -1.0, f"feature {j} sent to the steering panel (edit 1): press Generate"

    def use_dicts(spec):
        try:
            kinds = engine.use_dictionaries(spec)
        except ERRORS as e:
            return _err(e)
        return f"dictionaries: {', '.join(kinds) or 'none'}"

    def export(progress=gr.Progress()):
        from .export import export_dashboard

        try:
            folder = Path(tempfile.mkdtemp(prefix="diffusion-sae-dashboard-")) / "dashboard"
            stats = engine.stats(lambda i, n: progress(i / n, desc=f"feature statistics: {i}/{n} images"))
            export_dashboard(folder, stats, engine.index() if engine.dictionaries else None)
        except ERRORS as e:
            return None, _err(e)
        zpath = folder.with_suffix(".zip")
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    z.write(p, p.relative_to(folder.parent))
        return str(zpath), "dashboard exported"

    with gr.Blocks(title="diffusion-sae", analytics_enabled=False) as demo:
        gr.Markdown("## diffusion-sae · steer and erase concepts, explore SAE features")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="a red circle in solid style", elem_id="prompt", scale=4)
            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", scale=1)
            steps = gr.Slider(1, 100, value=engine.default_steps, step=1, label="Steps", elem_id="steps", scale=2)
        gr.Markdown(f"Edits: a concept ({concepts}; any phrase for text steering) or a block feature `#N`. "
                    "Strength < 0 removes, > 0 adds. Block ablation uses the dictionaries' step grid "
                    f"({engine.default_steps} steps).")
        rows = []
        for i in range(N_EDITS):
            with gr.Row():
                rows.append(gr.Textbox(label=f"Concept or feature {i + 1}", value="", elem_id=f"target-{i}", scale=3))
                rows.append(gr.Radio(list(METHODS), value=METHODS[0], label="Method", elem_id=f"method-{i}", scale=2))
                rows.append(gr.Slider(-3, 3, value=0, step=0.1, label="Strength", elem_id=f"strength-{i}", scale=3))
        # Any registered intervention (interventions/registry.py) by name; its settings as key=value.
        with gr.Row():
            method = gr.Dropdown([NONE] + intervention_names(), value=NONE, label="Registered intervention",
                                 elem_id="registered-method", scale=2)
            method_settings = gr.Textbox(label="Settings (key=value; ...)", value="", elem_id="registered-settings",
                                         placeholder="e.g. features=12:0,873:3; steps=0,10", scale=5)
        go = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            original = gr.Image(label="Original", type="pil", format="png", interactive=False, elem_id="original")
            result = gr.Image(label="Result", type="pil", format="png", interactive=False, elem_id="result")
        result_settings = gr.Markdown("", elem_id="result-settings")

        gr.Markdown("### Feature explorer (block SAE)")
        with gr.Row():
            feature = gr.Number(label="Feature index", value=0, precision=0, elem_id="feature")
            show = gr.Button("Show feature", elem_id="show-feature")
            to_steer = gr.Button("Send to steering panel", elem_id="send-to-steering")
        with gr.Row():
            query = gr.Textbox(label="Search features by concept", placeholder="e.g. red", elem_id="concept-query")
            find = gr.Button("Search", elem_id="search")
            dicts = gr.Textbox(label="Concept dictionaries (file names in the SAE folder, or all)", value="all",
                               elem_id="dictionaries")
            load = gr.Button("Use dictionaries", elem_id="use-dictionaries")
        explorer_status = gr.Markdown("", elem_id="explorer-status")
        found = gr.HTML("", elem_id="search-results")
        card = gr.HTML("", elem_id="feature-card")
        with gr.Row():
            exp = gr.Button("Export dashboard (zip)", elem_id="export")
            exported = gr.File(label="Dashboard", elem_id="dashboard-file")

        inputs = [prompt, seed, steps, *rows, method, method_settings]
        made = [original, result, status, result_settings]
        go.click(generate, inputs, made)
        # Every user change of a strength (drag, click, arrow keys, typed number) regenerates, latest
        # only: while one run is busy, the events that arrive are folded into one run of the last
        # value ("always_last"); none is dropped and none runs stale values after it.
        for s in rows[2::3]:
            s.input(generate, inputs, made, trigger_mode="always_last")
        show.click(show_feature, [feature], [card, explorer_status])
        feature.submit(show_feature, [feature], [card, explorer_status])
        find.click(search, [query], [found, explorer_status])
        query.submit(search, [query], [found, explorer_status])
        to_steer.click(send, [feature], [rows[0], rows[1], rows[2], explorer_status])
        load.click(use_dicts, [dicts], [explorer_status])
        exp.click(export, [], [exported, explorer_status])
    return demo


def theme():
    import gradio as gr

    # System fonts only: the default theme would link Google Fonts, which an offline machine cannot load.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(engine, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the server; with block=False returns (demo, url) and serves in a background thread."""
    from .render import CSS

    demo = build_app(engine)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                            ssr_mode=False, share=False, theme=theme(), css=CSS, footer_links=[])
    return demo, url
