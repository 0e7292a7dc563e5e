from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def quickstart_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart shards are written once per test session, into a private cache."""
    cache = os.environ.get("BIGSSL_TEST_CACHE") or str(tmp_path_factory.mktemp("bigssl-cache"))
    os.environ["BIGSSL_CACHE"] = cache
    return Path(cache)
