"""``python -m bridgecancel demo``: cancel real blocking work, beside today's anchors.

Layout (no module imports one that imports it back):

* `_work`: the jobs themselves, the same function for bridgecancel and for the anchor.
  Standard library and bridgecancel's tokens only, so worker processes load it fast.
* `_common`: `Comparison`, a thread or process case: start a job both ways, cancel both
  at once, time them, and word the row.
* `_cases`: the list of cases the demo runs, where more are registered (any
  ``async def case(backend: str) -> dict[str, str]``).
* `_main`: runs the list on each backend, with a progress line, and prints the table.

This package stays empty so that a worker process unpickling a job from `_work` does not
import anyio.
"""
