"""Web UI (Gradio) and static feature dashboards; gradio is imported only by `ui`."""
