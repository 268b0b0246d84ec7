"""Fixtures shared by the Python end-to-end tests."""

import os
import shutil
import tempfile

import pytest


@pytest.fixture
def data_dir():
    """A fresh data dir for the test's node, deleted after the test (kept when
    SIGNALPOST_TEST_KEEP=1, to look at a failed run's files)."""
    d = tempfile.mkdtemp(prefix="signalpost-py-")
    yield d
    if os.environ.get("SIGNALPOST_TEST_KEEP") != "1":
        shutil.rmtree(d, ignore_errors=True)
