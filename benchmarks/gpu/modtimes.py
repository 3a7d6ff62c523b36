"""A pytest plugin for the GPU runs (``-p modtimes``): per test module, the seconds its tests
took and their outcomes, rewritten to ``$MODTIMES_JSON`` after every test so that a run cut off
by a time limit still says which modules ran."""

from __future__ import annotations

import json
import os
from typing import Any

_TIMES: dict[str, dict[str, Any]] = {}


def pytest_runtest_logreport(report: Any) -> None:
    module = report.nodeid.split("::", 1)[0]
    row = _TIMES.setdefault(module, {"seconds": 0.0, "passed": 0, "failed": 0, "skipped": 0})
    row["seconds"] = round(row["seconds"] + report.duration, 3)
    if report.when == "call" or report.outcome != "passed":
        row[report.outcome] = row.get(report.outcome, 0) + 1
        if report.outcome == "failed":
            row.setdefault("failures", []).append(report.nodeid)
            row.setdefault("why", []).append(str(report.longrepr)[-1500:])
    path = os.environ.get("MODTIMES_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(_TIMES, f, indent=1)
