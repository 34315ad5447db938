"""The public API: `bridgecancel.__all__` is a sorted tuple of documented names."""

from __future__ import annotations

import types

import bridgecancel


def test_all_is_a_sorted_tuple_without_duplicates() -> None:
    assert isinstance(bridgecancel.__all__, tuple)
    assert list(bridgecancel.__all__) == sorted(bridgecancel.__all__)
    assert len(set(bridgecancel.__all__)) == len(bridgecancel.__all__)


def test_every_name_in_all_exists_and_has_a_docstring() -> None:
    for name in bridgecancel.__all__:
        assert hasattr(bridgecancel, name), f"bridgecancel.{name} is in __all__ but missing"
        doc = getattr(bridgecancel, name).__doc__  # its own, not inherited
        assert doc, f"bridgecancel.{name} has no docstring"
        assert doc.strip(), f"bridgecancel.{name} has an empty docstring"


def test_every_public_attribute_is_in_all() -> None:
    public = {
        name
        for name, value in vars(bridgecancel).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(bridgecancel.__all__), sorted(public - set(bridgecancel.__all__))


def test_the_package_has_a_docstring() -> None:
    assert bridgecancel.__doc__
