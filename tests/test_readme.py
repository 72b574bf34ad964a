"""The README's plain PyTorch example runs and prints what the README says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_plain_pytorch_example_output(tmp_path):
    example = next(block for block in fenced_blocks("python") if "KnobSet(" in block)
    expected = fenced_blocks("text")[0]
    script = tmp_path / "example.py"
    script.write_text(example)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_ci_runs_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README.read_text()
    assert "\npython -m pytest -q\n" in ci
