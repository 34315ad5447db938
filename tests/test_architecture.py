"""The import rules of docs/architecture.md, checked on the source (so the page stays true)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "bridgecancel"

# Standard library only, also through what they import: tokens, blocking waits, the
# process side (every module a worker process loads must be here).
STDLIB_ONLY = {
    "_util",
    "_exceptions",
    "_tokens",
    "_timer",
    "_interrupt",
    "_executor",
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
# CPython internals that only blocking._condition may touch (on objects other than `self`).
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
THIRD_PARTY = (
    "anyio", "trio", "sniffio", "pytest", "dask", "distributed", "celery", "kombu", "billiard",
    "redis",
)
# The anyio side: what the worker's side of a cluster or Celery adapter must not need.
ANYIO_SIDE = {"_backend", "_scopes", "_supervise", "_threads", "_process._run", "_process._pool"}


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


def _absolute(node: ast.ImportFrom, package: list[str]) -> str:
    """The absolute module name of a ``from ... import`` (``from .. import x`` in
    ``_process/_run.py`` is ``bridgecancel``)."""
    if node.level == 0:
        return node.module or ""
    base = ["bridgecancel", *package][: len(package) + 2 - node.level]
    return ".".join([*base, node.module] if node.module else base)


def _imports(name: str) -> Iterator[str]:
    """The absolute names a module imports anywhere in it (functions included)."""
    tree, package = MODULES[name]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            if node.level == 0 or node.module:
                yield base
            else:  # from . import x: each x may be a module
                yield from (f"{base}.{alias.name}" for alias in node.names)


def _own(imported: str) -> str | None:
    """The bridgecancel module an import names, without the package prefix."""
    if imported == "bridgecancel":
        return "__init__"
    if imported.startswith("bridgecancel."):
        return imported.removeprefix("bridgecancel.")
    return None


def _targets(node: ast.AST, package: list[str]) -> Iterator[str]:
    """The bridgecancel modules (names in MODULES) that one import statement loads by name.

    ``from p import a`` loads the submodule ``p.a`` if there is one, else takes ``a`` from
    ``p``. The packages a module sits in are loaded before it whatever it imports, so they
    count only where it names them.
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _absolute(node, package)
        names = [
            f"{base}.{alias.name}" if _own(f"{base}.{alias.name}") in MODULES else base
            for alias in node.names
        ]
    else:
        return
    for imported in names:
        own = _own(imported)
        if own in MODULES:
            yield own


def _edges(name: str) -> set[str]:
    """The bridgecancel modules `name` imports, at import time, in a function or under
    ``if TYPE_CHECKING:``: any of them makes `name` need that module."""
    tree, package = MODULES[name]
    return {own for node in ast.walk(tree) for own in _targets(node, package) if own != name}


def _closure(name: str) -> set[str]:
    """`name` and every bridgecancel module it imports, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(_edges(current))
    return seen


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt], *, type_checking: bool) -> Iterator[ast.stmt]:
    """A module's statements outside functions: those Python runs when it loads the module,
    and with `type_checking` also those in ``if TYPE_CHECKING:`` blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            skip = _is_type_checking(node.test) and not type_checking
            run = node.orelse if skip else [*node.body, *node.orelse]
            yield from _module_level(run, type_checking=type_checking)
        elif isinstance(node, (ast.Try, ast.With, ast.For, ast.While, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(node, field, []), type_checking=type_checking)
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body, type_checking=type_checking)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest circle through each module that is on one (``["a", "b", "a"]``), each
    once, starting from its first name, in name order."""
    # Tarjan's strongly connected components: the groups of modules that need one another.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    group_of: dict[str, set[str]] = {}

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while node not in group:
                group.add(stack.pop())
            for member in group:
                group_of[member] = group

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = set()
    for start, group in group_of.items():
        paths = {start: [start]}
        todo = [start]
        while todo:  # breadth first inside the group, back to `start`
            current = todo.pop(0)
            if start in graph.get(current, ()):
                circle = paths[current]
                first = circle.index(min(circle))
                cycles.add((*circle[first:], *circle[:first], min(circle)))
                break
            for nxt in sorted(graph.get(current, ())):
                if nxt in group and nxt not in paths:
                    paths[nxt] = [*paths[current], nxt]
                    todo.append(nxt)
    return sorted(list(c) for c in cycles)


def _literal(tree: ast.Module, name: str) -> object:
    """The value of a module-level ``name = <literal>`` (or ``name: type = <literal>``)."""
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(value)
    raise AssertionError(f"no {name} = ...")


def test_the_module_list_is_read() -> None:
    assert {"_tokens", "blocking", "testing", "_demo._main"} <= set(MODULES)
    assert set(MODULES) >= STDLIB_ONLY


def test_the_import_graph_is_read() -> None:
    # Each way bridgecancel imports itself: relative, from a package, absolute, in a function.
    assert {"_tokens", "blocking"} <= _edges("_demo._work")  # from .. import blocking
    assert "_process._wire" in _edges("_process._pool")  # from . import _wire as wire
    assert "_backend" in _edges("_supervise")  # from bridgecancel._backend import ...
    assert "_interrupt" in _edges("_threads")  # inside a function
    assert _cycles({"a": {"b"}, "b": {"c", "a"}, "c": set(), "d": {"d"}}) == [
        ["a", "b", "a"],
        ["d", "d"],
    ]
    assert _cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}) == [["a", "b", "a"], ["b", "c", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


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


def test_only_the_pytest_plugin_imports_pytest() -> None:
    importers = {
        name
        for name in MODULES
        for imported in _imports(name)
        if imported.split(".")[0] == "pytest"
    }
    assert importers == {"_pytest_plugin"}


def test_only_the_condition_module_touches_cpython_internals() -> None:
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


def test_no_import_circle() -> None:
    # Counting imports in functions and under `if TYPE_CHECKING:`: a circle that closes
    # only lazily, or only for the type checker, still means neither module stands alone.
    graph = {name: _edges(name) for name in MODULES}
    cycles = _cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_worker_process_loads_only_stdlib_only_modules() -> None:
    # A worker boots with `from bridgecancel._process._child import main`: Python runs the
    # packages on the way (the facade's import-time imports, then `_process`), then `_child`
    # and everything it imports, lazily or not. All of it must be on the stdlib-only list,
    # whose modules the test above checks one by one.
    tree, package = MODULES["__init__"]
    loaded = {"_process"} | _closure("_process._child")
    for node in _module_level(tree.body, type_checking=False):
        for own in _targets(node, package):
            loaded |= _closure(own)
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [_absolute(node, package)]
        else:
            continue
        for imported in names:
            assert not imported.startswith(THIRD_PARTY), f"the facade imports {imported}"
    assert loaded <= STDLIB_ONLY, f"a worker process loads {sorted(loaded - STDLIB_ONLY)}"


def test_the_parent_reaches_the_worker_process_only_through_pipes() -> None:
    # The pool starts `_process._child` by name in a new interpreter; no module imports it.
    assert not [name for name in MODULES if "_process._child" in _edges(name)]


def test_only_the_cluster_modules_import_dask() -> None:
    importers = {
        name
        for name in MODULES
        for imported in _imports(name)
        if imported.split(".")[0] in ("dask", "distributed")
    }
    assert importers == {"dask", "_dask_cluster", "_demo.cluster"}


def test_only_the_django_module_imports_django() -> None:
    importers = {
        name
        for name in MODULES
        for imported in _imports(name)
        if imported.split(".")[0] == "django"
    }
    assert importers == {"django"}


def test_only_the_celery_modules_import_celery_and_redis() -> None:
    # Celery with its kombu and billiard, and the Redis client: the adapter, its worker's
    # side (which the pool processes load without the caller's side), and the demo's app.
    importers = {
        name
        for name in MODULES
        for imported in _imports(name)
        if imported.split(".")[0] in ("celery", "kombu", "billiard", "redis")
    }
    assert importers == {"celery", "_celery_worker", "_demo.celery_app"}


@pytest.mark.parametrize("name", ["_dask_cluster", "_celery_worker"])
def test_the_worker_side_of_an_adapter_needs_no_anyio(name: str) -> None:
    # Dask's workers and Celery's pool processes run tasks in threads of their own: the
    # modules they load for bridgecancel need neither anyio nor the supervisor.
    closure = _closure(name)
    assert not closure & ANYIO_SIDE, f"{name} loads {sorted(closure & ANYIO_SIDE)}"
    for module in closure - {name}:
        assert module in STDLIB_ONLY, f"{name} loads {module}"
    if name == "_celery_worker":  # (`_dask_cluster` also holds the caller's ensure_plugins)
        for imported in _imports(name):
            assert not imported.startswith(("anyio", "trio")), f"{name} imports {imported}"


def test_the_packages_a_worker_may_load_are_empty() -> None:
    # `_process/__init__.py` runs in every worker before `_child`; `_demo/__init__.py` runs
    # in a worker that unpickles a demo job. Neither may load anything.
    assert (SRC / "_process" / "__init__.py").read_text() == ""
    tree, _ = MODULES["_demo"]
    assert all(isinstance(node, ast.Expr) for node in tree.body), (
        "_demo/__init__.py: docstring only"
    )


@pytest.mark.parametrize("name", ["__init__", "blocking"])
def test_the_facades_only_re_export(name: str) -> None:
    # A facade binds public names only as `from ._module import name as name` (for a
    # lazy name: under `if TYPE_CHECKING:`, with `_LAZY` naming the same module). Its own
    # code is private machinery: dunders, `_names`, no class.
    tree, package = MODULES[name]
    reexported: dict[str, str] = {}
    for node in _module_level(tree.body, type_checking=True):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            source = _own(_absolute(node, package))
            for alias in node.names:
                assert alias.asname == alias.name, f"{name}: import {alias.name} as itself"
                reexported[alias.name] = source or ""
        elif isinstance(node, (ast.Import, ast.ImportFrom)):  # the standard library
            for alias in node.names:
                bound = alias.asname or alias.name
                assert bound.startswith("_") or getattr(node, "module", "") == "__future__", (
                    f"{name}:{node.lineno} binds {bound}, a public name that is not a re-export"
                )
        elif isinstance(node, ast.ClassDef):
            raise AssertionError(f"{name}:{node.lineno} defines class {node.name}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.name.startswith("_"), f"{name}:{node.lineno} defines {node.name}()"
        else:
            targets = [
                *getattr(node, "targets", []),
                *[t for t in [getattr(node, "target", None)] if t is not None],
            ]
            for target in targets:
                for bound_name in ast.walk(target):
                    if isinstance(bound_name, ast.Name):
                        assert bound_name.id.startswith("_"), (
                            f"{name}:{node.lineno} assigns {bound_name.id}"
                        )
    all_names = _literal(tree, "__all__")
    assert isinstance(all_names, tuple)
    assert set(all_names) <= set(reexported), (
        f"{name}: not re-exported: {set(all_names) - set(reexported)}"
    )
    if name == "__init__":
        lazy = _literal(tree, "_LAZY")
        assert isinstance(lazy, dict)
        for public, module in lazy.items():
            assert reexported.get(public) == module.removeprefix("."), f"_LAZY[{public!r}]"


def test_only_the_backend_module_uses_trio_itself() -> None:
    # What differs between asyncio and trio lives in _backend: no other library module
    # reaches trio (its lowlevel API, its own scopes and events) through sys.modules.
    for name, (tree, _) in MODULES.items():
        if name == "_backend" or name.startswith("_demo"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == "trio":
                raise AssertionError(f"{name}:{node.lineno} names the module 'trio'")
