"""Fixtures of the GPU suite."""

import pytest

from tests.helpers import reference


@pytest.fixture(scope="session")
def ref():
    """The one-process CPU run every GPU layout is compared with."""
    return reference()
