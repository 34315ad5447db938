"""What a new user reads first: the README's samples run, install lines work without PyPI,
each example says what it needs, and the built docs work offline and show public names.

The built-docs tests need the ``docs`` dependency group (part of the ``test`` group).
"""

from __future__ import annotations

import ast
import html
import re
import subprocess
import sys
from importlib import metadata
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


# -- install lines work without PyPI ------------------------------------------------------
# bridgecancel is not on PyPI: an install line must install it from a checkout (``-e .``,
# ``".[dask]"``) or name where it is (``"bridgecancel[dask] @ file://..."``).

_INSTALL = re.compile(r"\b(?:pip3? install|uv pip install|pipx install|uv add)\b([^()#;|&`\n]*)")
# bridgecancel as a requirement (not a path such as ./bridgecancel), with no "@ <where>".
_FROM_INDEX = re.compile(r"(?<![\w./:-])bridgecancel(?:\[[^]]*\])?(?![\w.\[-]|\s*@)")


def _installs_from_pypi(line: str) -> bool:
    return any(_FROM_INDEX.search(rest) for rest in _INSTALL.findall(line))


def _text_files() -> list[Path]:
    """What a user reads or runs: README, docs, examples, the library, the benchmarks."""
    files = [README, ROOT / "pyproject.toml", *sorted((ROOT / ".ci").glob("*"))]
    for folder, patterns in [
        ("docs", ["*.md"]),
        ("examples", ["*.py"]),
        ("src", ["*.py"]),
        ("benchmarks", ["*.py", "*.md"]),
    ]:
        for pattern in patterns:
            files += sorted((ROOT / folder).rglob(pattern))
    return [f for f in files if f.is_file()]


@pytest.mark.parametrize(
    ("line", "from_pypi"),
    [
        ('pip install "bridgecancel[dask]"', True),
        ("python -m pip install bridgecancel", True),
        ("\"...: pip install 'bridgecancel[dask,trio]'\"", True),
        ("uv add bridgecancel==0.1", True),
        ('python -m pip install -e ".[dask]"', False),
        ('pip install "bridgecancel[dask] @ file:///home/me/bridgecancel"', False),
        ("pip install ./bridgecancel", False),
        ("pip install distributed (or, from a bridgecancel checkout, pip install -e .)", False),
    ],
)
def test_the_install_line_check_tells_pypi_from_a_checkout(line: str, from_pypi: bool) -> None:
    assert _installs_from_pypi(line) is from_pypi


def test_no_install_line_fetches_bridgecancel_from_pypi() -> None:
    files = _text_files()
    assert README in files
    assert ROOT / "src" / "bridgecancel" / "dask.py" in files
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _installs_from_pypi(line)
    ]
    assert not found, "bridgecancel is not on PyPI; install from a checkout:\n" + "\n".join(found)


# -- each example says what it needs beyond bridgecancel, and how to install it ------------

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _top_level_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def _installed_with_bridgecancel() -> set[str]:
    """bridgecancel and the modules of its own (not optional) dependencies."""
    requires = metadata.requires("bridgecancel") or []
    required = [r for r in requires if "extra ==" not in r]
    names = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0] for r in required}
    return {"bridgecancel"} | {name.lower().replace("-", "_") for name in names}


def test_the_examples_are_found() -> None:
    assert ROOT / "examples" / "recipe_postgres.py" in EXAMPLES
    assert "anyio" in _installed_with_bridgecancel()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_each_example_docstring_names_what_it_needs_and_how_to_install_it(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree) or ""
    needs = _top_level_imports(tree) - set(sys.stdlib_module_names)
    needs -= _installed_with_bridgecancel()
    unnamed = sorted(n for n in needs if not re.search(rf"\b{n}\b", doc, re.IGNORECASE))
    assert not unnamed, f"{path.name} imports {unnamed} but its docstring does not name them"
    if needs:
        assert "pip install" in doc, f"{path.name} needs {sorted(needs)}: say how to install"


# -- the built docs work offline ---------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs, built as ``mkdocs build`` builds them (not strict: others' warnings are
    the docs build's business, checked by CI, not these tests')."""
    pytest.importorskip("mkdocs", reason="the docs dependency group is not installed")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)  # http://, https://, //


def test_mkdocs_yml_highlights_code_at_build_time_without_a_cdn() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    # The mkdocs theme loads highlight.js from cdnjs unless told not to.
    assert re.search(r"^  highlightjs: false$", config, re.MULTILINE)
    assert "pymdownx.highlight" in config
    assert not re.search(r"https?://", config)


@pytest.mark.slow
def test_the_built_docs_load_no_script_or_style_from_another_site(site: Path) -> None:
    pages = sorted(site.rglob("*.html"))
    assert site / "index.html" in pages
    external = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for tag in re.findall(r"<(?:script|link)\b[^>]*>", text):
            for url in re.findall(r"\b(?:src|href)=[\"']([^\"']*)", tag):
                if _EXTERNAL.match(url):
                    external.append(f"{page.relative_to(site)}: {tag}")
    assert not external, "\n".join(external)


@pytest.mark.slow
def test_the_built_docs_highlight_python_code(site: Path) -> None:
    # Pygments' markup (<span class="kn">import</span>) and its stylesheet, served locally.
    index = (site / "index.html").read_text(encoding="utf-8")
    assert '<span class="kn">import</span>' in index
    assert re.search(r'<link [^>]*href="css/pygments\.css"', index)
    assert ".highlight .kn" in (site / "css" / "pygments.css").read_text(encoding="utf-8")


# -- the API reference shows public names only -------------------------------------------

_PRIVATE = re.compile(r"(?<![\w.])_[A-Za-z]\w*")


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


@pytest.mark.slow
def test_signatures_in_the_reference_show_no_private_names(site: Path) -> None:
    found = []
    pages = [p for p in sorted(site.rglob("*.html")) if "doc-signature" in p.read_text()]
    assert site / "api" / "index.html" in pages
    assert site / "web" / "index.html" in pages  # bridgecancel.asgi's reference
    for page in pages:
        text = page.read_text(encoding="utf-8")
        signatures = re.findall(r'<div class="doc-signature[^"]*">(.*?)</div>', text, re.DOTALL)
        # Parameter lists name each type and default again: <span title="module.Name">.
        cross = re.findall(r'<span title="bridgecancel[\w.]*">([^<]*)</span>', text)
        for fragment in [*signatures, *cross]:
            for name in set(_PRIVATE.findall(_text(fragment))):
                found.append(f"{page.relative_to(site)}: {name}")
    assert not found, "private names in the reference:\n" + "\n".join(sorted(set(found)))
