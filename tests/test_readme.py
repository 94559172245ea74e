"""The README runs as written: its Python blocks, in order, and its links to docs/."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = _read("README.md")
    assert len(text.splitlines()) < 250
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.splitlines()[0].startswith("bash .ci/setup && .venv/bin/python -m bsam_fast.demo")
    assert first_block.splitlines()[1].startswith(".venv/bin/python -m pytest -q tests")


def test_the_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("bsam_fast._C", reason="the quickstart is timed with the compiled kernels")
    blocks = re.findall(r"```python\n(.*?)```", _read("README.md"), re.S)
    assert blocks, "the README has a quickstart"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ECE" in printed
    assert len(namespace["stds"]) == len(list(namespace["model"].parameters()))


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{p}" for p in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                                  if p.endswith(".md")])
def test_relative_links_point_at_files(page):
    folder = os.path.dirname(os.path.join(ROOT, page))
    for target in re.findall(r"\]\(([^)#:]+)\)", _read(page)):
        assert os.path.exists(os.path.join(folder, target)), f"{page} links to a missing {target}"
