"""The fault suite's fixtures (one prepared corpus and one uninterrupted micro run per session)
and its tallies, printed at the end of the session and required to be 100%."""

import pytest

from tests.faults import tally
from tests.faults.runs import MICRO_STEPS, train, write_run


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_shards") / "embedded"


@pytest.fixture(scope="session")
def ref_run(tmp_path_factory, shards):
    """The uninterrupted run every resumed one must reproduce bit for bit."""
    cfg = write_run(tmp_path_factory.mktemp("fault_ref"), shards, "ref", MICRO_STEPS)
    train(cfg)
    return cfg.parent / "ref", cfg


def pytest_terminal_summary(terminalreporter):
    lines = tally.summary()
    if lines:
        terminalreporter.section("fault injection tallies")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session):
    if not tally.complete() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
