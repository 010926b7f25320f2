from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

# pytest-xdist runs one worker per core: one torch thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# ten times the CI volume, random seeds: `pytest --hypothesis-profile nightly` (README "Tests")
settings.register_profile("nightly", parent=settings.get_profile("ci"), derandomize=False, max_examples=80)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# -- the count of hypothesis-generated cases of a run (summed from hypothesis' own statistics) -----
_PASSING = re.compile(r"(\d+) passing\b")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    cases = tests = 0
    for reports in terminalreporter.stats.values():
        for report in reports:
            stats = getattr(report, "__dict__", {}).get("_hypothesis_stats")  # the hypothesis plugin's key
            n = sum(int(m) for m in _PASSING.findall(stats or ""))
            if n:
                cases, tests = cases + n, tests + 1
    if tests:
        profile = getattr(settings, "_current_profile", None) or "ci"
        terminalreporter.write_line(f"stepq: {cases} hypothesis-generated cases passed in {tests} property tests "
                                    f"(profile {profile})")
