"""What a new user reads first: the README's samples run, install lines work without PyPI,
each example says what it needs, and the built docs work offline and show public names.

The built-docs tests need the ``docs`` dependency group (part of the ``test`` group).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", markdown, re.DOTALL | re.MULTILINE)


# -- the README's samples run on every supported Python -----------------------------------
# (CI runs the suite on 3.10, 3.11, 3.12 and 3.13, so each sample is run on all of them.)

README_SAMPLES = _python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_its_asyncio_and_trio_samples() -> None:
    assert len(README_SAMPLES) >= 2
    assert any("asyncio.run(" in code for code in README_SAMPLES)
    assert any("trio.run(" in code for code in README_SAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize(
    "code", README_SAMPLES, ids=[f"sample{i}" for i in range(len(README_SAMPLES))]
)
def test_each_readme_sample_runs_and_prints_its_outcome(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the sample printed nothing"
