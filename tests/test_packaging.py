"""The installed distribution's metadata: what ``pip show`` and package indexes read."""

from __future__ import annotations

from importlib import metadata


def test_metadata_names_author_license_and_supported_platforms() -> None:
    meta = metadata.metadata("bridgecancel")
    assert meta["Author"] == "bridgecancel developers"
    assert meta["License-Expression"] == "MIT"
    classifiers = meta.get_all("Classifier") or []
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert not any(c.startswith("License :: ") for c in classifiers)  # PEP 639


def test_the_license_file_ships_with_the_distribution() -> None:
    dist = metadata.distribution("bridgecancel")
    assert "LICENSE" in (dist.metadata.get_all("License-File") or [])
    licenses = [f for f in dist.files or [] if f.name == "LICENSE"]
    assert licenses, "LICENSE is not in the installed distribution"
    assert "MIT License" in licenses[0].read_text()


def test_the_pytest_plugin_is_registered_as_an_entry_point() -> None:
    # Named as users load it by hand (-p bridgecancel.testing); the value is the module
    # with the hooks and fixtures.
    plugins = metadata.entry_points(group="pytest11")
    assert [ep.value for ep in plugins if ep.name == "bridgecancel.testing"] == [
        "bridgecancel._pytest_plugin"
    ]
