"""One emulated GCS server (tests/gcs.py) for the module tests of this folder."""

import pytest

from tests import gcs


@pytest.fixture(scope="session")
def gcs_url():
  with gcs.emulator("bucket") as url:
    yield url
