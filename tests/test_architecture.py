"""The import rules of docs/architecture.md, checked on the source (so the page stays true)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "bridgecancel"

# Standard library only, also through what they import: tokens, blocking waits, the
# process side.
STDLIB_ONLY = {
    "_util",
    "_exceptions",
    "_tokens",
    "_timer",
    "_interrupt",
    "blocking",
    "blocking._common",
    "blocking._condition",
    "blocking._sync",
    "blocking._fd",
    "blocking._subprocess",
    "_process",
    "_process._child",
    "_process._wire",
}
# CPython internals that only _cpython may touch (on objects other than `self`).
CPYTHON_INTERNALS = {
    "_waiters",
    "_release_save",
    "_acquire_restore",
    "_is_owned",
    "_qsize",
    "_cond",
    "_condition",
    "_value",
    "not_empty",
    "not_full",
}
THIRD_PARTY = ("anyio", "trio", "sniffio", "pytest", "dask", "distributed")


def _modules() -> dict[str, tuple[ast.Module, list[str]]]:
    """Every module by dotted name below bridgecancel (``_demo._work``), with its package."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[:-1]
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = (ast.parse(path.read_text(), str(path)), package)
    return found


MODULES = _modules()


def _imports(name: str) -> Iterator[str]:
    """The absolute names a module imports anywhere in it (functions included)."""
    tree, package = MODULES[name]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.module or ""
                continue
            base = ["bridgecancel", *package][: len(package) + 2 - node.level]
            if node.module:
                yield ".".join([*base, node.module])
            else:  # from . import x: each x may be a module
                yield from (".".join([*base, alias.name]) for alias in node.names)


def _own(imported: str) -> str | None:
    """The bridgecancel module an import names, without the package prefix."""
    if imported == "bridgecancel":
        return "__init__"
    if imported.startswith("bridgecancel."):
        return imported.removeprefix("bridgecancel.")
    return None


def test_the_module_list_is_read() -> None:
    assert {"_tokens", "blocking", "testing", "_demo._main"} <= set(MODULES)
    assert set(MODULES) >= STDLIB_ONLY


def _closure(name: str) -> set[str]:
    """`name` and every bridgecancel module it imports, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for imported in _imports(current):
            own = _own(imported)
            if own is not None and own in MODULES and own != "__init__":
                todo.append(own)
    return seen


@pytest.mark.parametrize("name", sorted(STDLIB_ONLY))
def test_stdlib_only_modules_import_no_third_party_code(name: str) -> None:
    # Directly or through any bridgecancel module they import, lazily or not.
    for module in sorted(_closure(name)):
        for imported in _imports(module):
            assert not imported.startswith(THIRD_PARTY), f"{name} -> {module} imports {imported}"


def test_no_module_reaches_into_private_modules_of_anyio_or_trio() -> None:
    for name in MODULES:
        for imported in _imports(name):
            parts = imported.split(".")
            if parts[0] in ("anyio", "trio"):
                assert not any(p.startswith("_") for p in parts[1:]), f"{name}: {imported}"


def test_only_the_demo_and_the_command_line_import_the_demo() -> None:
    for name in MODULES:
        if name.startswith("_demo") or name == "__main__":
            continue
        for imported in _imports(name):
            assert not (_own(imported) or "").startswith("_demo"), f"{name} imports the demo"


def test_only_the_fixtures_module_imports_pytest() -> None:
    importers = {
        name
        for name in MODULES
        for imported in _imports(name)
        if imported.split(".")[0] == "pytest"
    }
    assert importers == {"_pytest_plugin"}


def test_only_cpython_touches_cpython_internals() -> None:
    for name, (tree, _) in MODULES.items():
        if name == "blocking._condition":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in CPYTHON_INTERNALS
                and not (isinstance(node.value, ast.Name) and node.value.id == "self")
            ):
                raise AssertionError(f"{name}:{node.lineno} reads .{node.attr}")


def test_the_architecture_page_lists_every_module() -> None:
    page = (SRC.parent.parent / "docs" / "architecture.md").read_text()
    for name in MODULES:
        if name == "__init__" or name.endswith(".__init__") or name == "_demo":
            continue
        path = name.replace(".", "/")
        path += "/__init__.py" if (SRC / path).is_dir() else ".py"
        assert f"`{path}`" in page, f"docs/architecture.md does not list {path}"
