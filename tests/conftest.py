from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from hypothesis import settings
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

sys.path.insert(0, str(Path(__file__).parent))

from earmark.demo_build import DemoCorpus, build_demo_corpus
from fixtures.build import FixtureBuilder

# CI runs the property tests on a fixed sequence of examples so a red run is reproducible and a
# green one means something; developers keep random exploration (and regressions it finds get a
# named test, e.g. test_hostile.test_code_mapped_above_two_to_the_63).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# A PostgreSQL URL whose role may CREATE DATABASE; `scripts/postgres.sh start` prints one and
# scripts/test.sh exports it. Each test gets a database of its own, dropped afterwards.
POSTGRES_URL_ENV_VAR = "EARMARK_TEST_POSTGRES_URL"
# Set (by scripts/test.sh, which started the server) to fail rather than skip when the
# PostgreSQL tests cannot run, so CI cannot go green without them.
REQUIRE_POSTGRES_ENV_VAR = "EARMARK_TEST_REQUIRE_POSTGRES"

FreshPostgresDatabase = Callable[[], AbstractContextManager[str]]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> DemoCorpus:
    """The demo corpus (``earmark.demo_build``) built by gcc at -O2, once per session, for the
    modules that ingest real binaries into a KB; a module that needs another corpus defines
    its own ``corpus``. Tests only read it."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return build_demo_corpus(tmp_path_factory.getbasetemp() / "demo-corpus", "gcc", ("O2",))


@pytest.fixture(scope="session")
def builder(tmp_path_factory: pytest.TempPathFactory) -> FixtureBuilder:
    """Compiles C fixtures once per session; tests ask it for (source, toolchain, -O level)."""
    return FixtureBuilder(tmp_path_factory.mktemp("builds"))


def _postgres_unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_POSTGRES_ENV_VAR):
        pytest.fail(f"PostgreSQL tests are required here but cannot run: {reason}")
    pytest.skip(
        f"PostgreSQL backend not tested: {reason}; start a throwaway server with "
        f"`sudo bash scripts/postgres.sh start` and export its URL as {POSTGRES_URL_ENV_VAR}"
    )


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The server-wide URL tests create their databases through (skips when there is none)."""
    url = os.environ.get(POSTGRES_URL_ENV_VAR, "")
    if not url:
        _postgres_unavailable(f"{POSTGRES_URL_ENV_VAR} is not set")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        _postgres_unavailable(f"cannot connect to {POSTGRES_URL_ENV_VAR}: {error}")
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def fresh_postgres_database(postgres_admin_url: str) -> FreshPostgresDatabase:
    """``with fresh_postgres_database() as url:`` an empty database, dropped at the end."""

    @contextmanager
    def fresh() -> Iterator[str]:
        name = f"earmark_test_{uuid.uuid4().hex[:16]}"
        # CREATE/DROP DATABASE cannot run inside a transaction.
        admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                url = make_url(postgres_admin_url).set(database=name)
                yield url.render_as_string(hide_password=False)
            finally:
                with admin.connect() as connection:
                    # FORCE: a store a failing test left open must not keep the database alive.
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()

    return fresh


@pytest.fixture
def postgres_url(fresh_postgres_database: FreshPostgresDatabase) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    with fresh_postgres_database() as url:
        yield url
