"""Fixtures shared by the parity tests."""

import pytest

from tests.helpers import reference


@pytest.fixture(scope="session")
def ref():
    """The one-process run every layout is compared with (computed once per test session)."""
    return reference()
