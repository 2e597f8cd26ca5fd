from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures.build import FixtureBuilder


@pytest.fixture(scope="session")
def builder(tmp_path_factory: pytest.TempPathFactory) -> FixtureBuilder:
    """Compiles C fixtures once per session; tests ask it for (source, toolchain, -O level)."""
    return FixtureBuilder(tmp_path_factory.mktemp("builds"))
