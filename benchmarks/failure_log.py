"""A pytest plugin that writes each failure's report to a file the moment it happens.

    python -m pytest -p benchmarks.failure_log ...      # file: $FAILURE_LOG (failures.log)

pytest prints the reports of failed tests only at the end of the session, and so does
pytest-xdist; a run cut at its time cap (``gpu_round.py``) would lose all of them. This hook
runs in the controlling process, also under xdist, and appends each report as it arrives.
"""

import os


def pytest_runtest_logreport(report):
    """Append the report of a failed setup, call or teardown (its whole traceback)."""
    if not report.failed:
        return
    with open(os.environ.get("FAILURE_LOG", "failures.log"), "a") as log:
        log.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
