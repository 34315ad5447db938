"""Starlette's own test suite, bare and with every app wrapped in CancelOnDisconnectMiddleware.

    python .ci/starlette_conformance.py [--keep DIR] [--reruns N] [-- PYTEST ARGS]

Run from this checkout with the Python whose Starlette should be checked (the one the
project is installed into). It:

1. downloads the source distribution of the Starlette version installed in that Python
   from PyPI (``pip download --no-binary :all: --no-deps starlette==V``) and unpacks it in
   a temporary folder (nothing is written into the checkout);
2. makes a venv there and installs Starlette from that source with its ``full`` extra,
   the test tools of its ``dev`` dependency group (or its ``requirements.txt``, in older
   releases), pytest-timeout, and bridgecancel from this checkout;
3. runs Starlette's tests twice, each time on every anyio backend (its ``TestClient``
   and async tests run on asyncio and trio): bare, then with ``_starlette_wrap`` (this
   folder) wrapping every app that a ``TestClient`` or an httpx ``ASGITransport`` calls;
4. runs each test that passed bare but not wrapped again, ``--reruns`` times each way, to
   tell a failure the middleware causes every time from a flaky one, and prints them.

Exits 1 if a test that passed bare failed wrapped, unless it is one of the `KNOWN`
differences below (printed all the same, with their cause; ``--strict`` fails on those
too); 0 otherwise. ``--keep DIR`` keeps the folder (its venv is reused by the next run
given the same DIR).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
# Tools in Starlette's dev group that its tests do not need (type checkers, linters,
# coverage, benchmarks, release checks; type stubs, types-*, too).
NOT_FOR_TESTS = {"coverage", "mypy", "ruff", "twine", "pytest-codspeed", "starlette"}
PASSED = ("passed", "skipped", "xfailed")

# Differences understood and tracked, each with its cause: reported, but not a failure
# unless --strict. Remove an entry once the middleware no longer causes it.
KNOWN = {
    "tests/test_requests.py::test_request_is_disconnected[trio]": (
        "flaky: after the response, is_disconnected() polls receive() in a cancelled scope; "
        "the middleware hands over the disconnect only once its watcher has read it, which "
        "trio may schedule after the app (tests/test_asgi_conformance.py shows it under "
        "uvicorn, every time)"
    ),
}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower()


def _for_tests(requirement: str) -> bool:
    name = _name(requirement)
    return name not in NOT_FOR_TESTS and not name.startswith("types-")


def _run(command: list[str], **kwargs: object) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def download(version: str, into: Path) -> Path:
    """Starlette's sdist for `version`, from PyPI, unpacked into `into`; its folder."""
    _run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
         f"starlette=={version}", "-d", str(into)]
    )  # fmt: skip
    [archive] = into.glob(f"starlette-{version}.tar.gz")
    with tarfile.open(archive) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(into, filter="data")
        else:  # pragma: no cover - 3.10 and 3.11 have no extraction filters
            tar.extractall(into)
    return into / f"starlette-{version}"


def test_requirements(source: Path) -> list[str]:
    """What Starlette's tests need beyond Starlette[full]: its dev group, less the tools."""
    pyproject = source / "pyproject.toml"
    requirements: list[str] = []
    if sys.version_info >= (3, 11) and pyproject.exists():  # tomllib; 3.10 reads requirements.txt
        import tomllib

        data = tomllib.loads(pyproject.read_text())
        requirements = [r for r in data.get("dependency-groups", {}).get("dev", [])
                        if isinstance(r, str)]  # fmt: skip
    if not requirements and (source / "requirements.txt").exists():
        lines = (source / "requirements.txt").read_text().splitlines()
        requirements = [line.split("#")[0].strip() for line in lines]
        requirements = [r for r in requirements if r and not r.startswith("-")]
    return [r for r in requirements if _for_tests(r)]


def make_venv(source: Path, where: Path) -> Path:
    """A venv in `where` with Starlette from `source`, its test needs and bridgecancel."""
    python = where / "bin" / "python"
    stamp = where / "installed-from"
    if stamp.exists() and stamp.read_text() == str(source):
        return python  # kept by --keep from an earlier run
    venv.create(where, with_pip=True, clear=True)
    _run([str(python), "-m", "pip", "install", "-q", "-U", "pip"])
    _run(
        [str(python), "-m", "pip", "install", "-q", f"{source}[full]", *test_requirements(source),
         "pytest-timeout", f"{CHECKOUT}[trio]"]
    )  # fmt: skip
    stamp.write_text(str(source))
    return python


def run_suite(
    python: Path, source: Path, wrapped: bool, outcomes: Path, args: list[str]
) -> tuple[dict[str, dict[str, str]], float]:
    """Run Starlette's tests; the outcome of each and the seconds it took."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE)  # _starlette_wrap
    env["BRIDGECANCEL_WRAP"] = "1" if wrapped else "0"
    env["BRIDGECANCEL_OUTCOMES"] = str(outcomes)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [str(python), "-m", "pytest", "-p", "_starlette_wrap", "-p", "no:cacheprovider",
               "-q", "--timeout=60", "-o", "console_output_style=classic", *args]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, cwd=source, env=env, stdout=subprocess.DEVNULL, check=False)
    took = time.monotonic() - started
    if not outcomes.exists():
        raise SystemExit(f"pytest wrote no outcomes ({' '.join(command)} in {source})")
    found: dict[str, dict[str, str]] = json.loads(outcomes.read_text())
    outcomes.unlink()
    return found, took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="keep the work folder here (and reuse it)")
    parser.add_argument("--reruns", type=int, default=3, help="reruns of each difference")
    parser.add_argument("--strict", action="store_true", help="fail on KNOWN differences too")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    options = parser.parse_args(argv)
    version = importlib.metadata.version("starlette")
    work = options.keep or Path(tempfile.mkdtemp(prefix="starlette-conformance-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        source = work / f"starlette-{version}"
        if not source.exists():
            source = download(version, work)
        python = make_venv(source, work / "venv")
        prepared = time.monotonic() - started
        outcomes = work / "outcomes.json"
        bare, bare_took = run_suite(python, source, False, outcomes, options.pytest_args)
        wrapped, wrapped_took = run_suite(python, source, True, outcomes, options.pytest_args)
        differences = sorted(
            test for test, seen in bare.items()
            if seen["outcome"] in PASSED and wrapped.get(test, {}).get("outcome") not in PASSED
        )  # fmt: skip
        print(
            f"\nStarlette {version}: {len(bare)} tests; bare "
            f"{sum(s['outcome'] in PASSED for s in bare.values())} passed ({bare_took:.0f} s), "
            f"wrapped {sum(s['outcome'] in PASSED for s in wrapped.values())} passed "
            f"({wrapped_took:.0f} s); setup {prepared:.0f} s"
        )
        failed_bare = sorted(t for t, s in bare.items() if s["outcome"] not in PASSED)
        for test in failed_bare:  # not the middleware's doing, but worth seeing
            print(f"  fails bare too: {test}: {bare[test]['why']}")
        if not differences:
            print("no test that passes bare fails wrapped")
            return 0
        print(f"{len(differences)} passed bare and failed wrapped; rerunning each "
              f"{options.reruns} times each way:")  # fmt: skip
        for test in differences:
            counts = {"bare": 0, "wrapped": 0}
            for _ in range(options.reruns):
                for how in counts:
                    seen, _took = run_suite(python, source, how == "wrapped", outcomes, [test])
                    counts[how] += seen.get(test, {}).get("outcome") not in PASSED
            kind = "every time" if counts["wrapped"] == options.reruns else "flaky"
            print(
                f"- {test} [{kind}: failed wrapped {counts['wrapped'] + 1} of "
                f"{options.reruns + 1} runs, bare {counts['bare']} of {options.reruns + 1}]\n"
                f"    {wrapped[test]['outcome']}: {wrapped[test]['why']}"
            )
            if test in KNOWN:
                print(f"    known: {KNOWN[test]}")
        new = [test for test in differences if test not in KNOWN]
        if new or options.strict:
            return 1
        print("only known differences: not a failure (--strict makes it one)")
        return 0
    finally:
        print(f"took {time.monotonic() - started:.0f} s in all")
        if options.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
