"""The README's Python example runs as written on the bundled model."""
import doctest
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_passes():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for i, block in enumerate(blocks):
        test = parser.get_doctest(block, {}, f"README block {i}", str(README), 0)
        assert test.examples, f"README python block {i} has no >>> examples"
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} README example(s) failed (see output above)"


def test_readme_commands_exist():
    """Every `diffusion-sae X` command named in the README is a registered command."""
    from typer.main import get_command

    from diffusion_sae.cli import app

    root = get_command(app)
    for line in README.read_text().splitlines():
        # commands: in code blocks (line start) or inline code (after a backtick), not in prose
        for m in re.finditer(r"(?:^\s*|`)diffusion-sae ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)", line):
            words = m.group(1).split()
            cmd = root.commands.get(words[0])
            assert cmd is not None, f"README names unknown command {words[0]!r}: {line}"
            if getattr(cmd, "commands", None) and len(words) > 1 and words[1] in cmd.commands:
                continue
