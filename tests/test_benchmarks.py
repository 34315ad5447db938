"""How the benchmarks report their targets (``benchmarks/_harness.py``, standard library
only, loaded from the checkout): a target this run did not measure says so and why,
rather than an empty figure with a verdict."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_harness", BENCHMARKS / "_harness.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


h = _load_harness()

RESULTS = {
    "targets": [
        {"name": "cancel latency p50", "target": "<= 1 ms", "measured": "0.42 ms", "met": True},
        {"name": "flood", "target": "<= 0.5 s", "measured": "0.69 s", "met": False},
        {
            "name": "requests/s overhead (uvicorn, noop)",
            "target": "<= 5%",
            "measured": None,
            "met": None,
            "why": "wrk is not installed",
        },
        {"name": "figure left out", "target": "<= 2 ms", "met": True},  # no "measured"
    ]
}


def _target_lines(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    h.print_results(RESULTS)
    out = capsys.readouterr().out
    lines = out.split("targets:\n", 1)[1].splitlines()
    return {name: line for line in lines for name in ("latency", "flood", "uvicorn", "left out")
            if name in line}


def test_a_target_without_a_figure_says_not_measured_and_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _target_lines(capsys)["uvicorn"]
    assert "not measured (wrk is not installed)" in line
    assert "met" not in line.replace("measured", "")  # neither met nor NOT met
    assert "target <= 5%" in line


def test_a_target_with_no_measured_key_is_not_measured_either(
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = _target_lines(capsys)["left out"]
    assert "not measured (" in line
    assert "met" not in line.replace("measured", "")


def test_measured_targets_print_their_verdict_and_figure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = _target_lines(capsys)
    assert lines["latency"].split()[0] == "met"
    assert "measured 0.42 ms" in lines["latency"]
    assert lines["flood"].split()[:2] == ["NOT", "met"]
    assert "measured 0.69 s" in lines["flood"]


def test_target_lines_give_none_for_unmeasured_in_both_result_styles() -> None:
    assert [met for _, met, _ in h.target_lines(RESULTS["targets"])] == [
        True, False, None, None
    ]
    assert h.target_lines({"a": True, "b": None}) == [
        ("a", True, ""),
        ("b", None, "not measured (no figure in this run)"),
    ]
