"""The public API: every public module's `__all__` is a sorted tuple of documented names
whose functions and classes say they live in that public module."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types

import pytest

import bridgecancel


def _public_module_names() -> list[str]:
    """`bridgecancel` and every module below it without a private part in its name."""
    names = ["bridgecancel"]
    for info in pkgutil.walk_packages(bridgecancel.__path__, "bridgecancel."):
        parts = info.name.split(".")
        if not any(part.startswith("_") for part in parts):
            names.append(info.name)
    return names


PUBLIC_MODULES = _public_module_names()


def _import(name: str) -> types.ModuleType | None:
    """The module, or None if it needs an optional dependency that is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        error = exc
    # An optional extra (e.g. bridgecancel.dask) must say how to get it.
    assert "install" in str(error), f"importing {name} failed without a hint: {error!r}"
    return None


def _is_function_or_class(value: object) -> bool:
    return isinstance(value, types.FunctionType) or inspect.isclass(value)


def test_the_public_modules_are_found() -> None:
    assert {"bridgecancel", "bridgecancel.blocking", "bridgecancel.testing"} <= set(PUBLIC_MODULES)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_a_sorted_tuple_without_duplicates(name: str) -> None:
    module = _import(name)
    if module is None:
        return
    all_names = getattr(module, "__all__", None)
    assert isinstance(all_names, tuple), f"{name}.__all__ must be a tuple, got {all_names!r}"
    assert list(all_names) == sorted(all_names), f"{name}.__all__ is not sorted"
    assert len(set(all_names)) == len(all_names), f"{name}.__all__ has duplicates"
    assert module.__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_name_in_all_exists_and_is_documented(name: str) -> None:
    module = _import(name)
    if module is None:
        return
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr} is in __all__ but missing"
        value = getattr(module, attr)
        if callable(value):
            doc = getattr(value, "__doc__", None)
            assert doc, f"{name}.{attr} has no docstring"
            assert doc.strip(), f"{name}.{attr} has an empty docstring"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_exported_functions_and_classes_say_they_live_in_the_public_module(name: str) -> None:
    # As anyio's: an exported function or class has its public module as __module__ (so
    # that reprs, pickles and the docs show where users import it from), never a private
    # one like bridgecancel._token.
    module = _import(name)
    if module is None:
        return
    wrong = {
        attr: value.__module__
        for attr in module.__all__
        if _is_function_or_class(value := getattr(module, attr)) and value.__module__ != name
    }
    assert not wrong, f"set __module__ = {name!r} for {name}.<name>: {wrong}"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_public_function_and_class_of_the_module_is_in_all(name: str) -> None:
    module = _import(name)
    if module is None:
        return
    exported = set()
    for attr in dir(module):
        if attr.startswith(("_", "pytest_")):  # pytest_*: hooks of a pytest plugin
            continue
        value = getattr(module, attr)
        if _is_function_or_class(value) and value.__module__ == name:
            exported.add(attr)
    missing = exported - set(module.__all__)
    assert not missing, f"public in {name} but not in its __all__: {sorted(missing)}"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_no_public_name_is_a_module(name: str) -> None:
    module = _import(name)
    if module is None:
        return
    modules = [
        attr for attr in module.__all__ if isinstance(getattr(module, attr), types.ModuleType)
    ]
    assert not modules, f"{name}.__all__ lists modules: {modules}"


def test_every_public_attribute_of_the_package_is_in_all() -> None:
    public = {
        name
        for name, value in vars(bridgecancel).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(bridgecancel.__all__), sorted(public - set(bridgecancel.__all__))
