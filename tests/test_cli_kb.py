"""The knowledge-base commands through click's CliRunner, and one real `earmark demo` run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from earmark.attribution import open_knowledge_base
from earmark.cli import cli
from earmark.demo_build import DemoCorpus


@pytest.fixture(scope="module")
def database(corpus: DemoCorpus, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("cli-kb") / "kb.db")
    runner = CliRunner()
    for binary in corpus.select(role="kb"):
        result = runner.invoke(cli, [
            "ingest", "--db", path, str(binary.path), "--actor", binary.actor or "",
            "--family", binary.family, "--source", "cli test",
        ])
        assert result.exit_code == 0, result.output
    goodware = [str(b.path) for b in corpus.select(role="goodware")]
    result = runner.invoke(cli, ["ingest", "--db", path, "--goodware", *goodware])
    assert result.exit_code == 0, result.output
    assert "ingested 1, skipped 0" in result.output
    return path


def test_ingest_builds_what_queries_read(database: str) -> None:
    # Index building belongs to ingest: both caches exist, for the KB's current revision,
    # before any query runs (and the first query does not rebuild them).
    folder = Path(database).parent
    features = json.loads((folder / "kb.db.features" / "manifest.json").read_text())
    index_files = sorted(path.name for path in (folder / "kb.db.index").iterdir())
    assert index_files and features["rows"] > 0
    with open_knowledge_base(database) as kb:
        assert features["revision"] == kb.store.revision()


def test_reingest_skips_and_keeps_one_copy(corpus: DemoCorpus, database: str) -> None:
    alpha = corpus.binary("alpha-v1", "O2")
    result = CliRunner().invoke(cli, [
        "ingest", "--db", database, str(alpha.path), "--actor", "Group A", "--family", "alpha",
    ])
    assert result.exit_code == 0
    assert "ingested 0, skipped 1" in result.output


def test_attribute_json_contract(corpus: DemoCorpus, database: str) -> None:
    query = corpus.binary("alpha-v3", "O2")
    result = CliRunner().invoke(
        cli, ["attribute", "--db", database, str(query.path), "--format", "json", "--top", "3"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert len(document["sha256"]) == 64
    assert len(document["hypotheses"]) <= 3
    assert document["hypotheses"][0]["actor"] == "Group A"
    assert document["evidence"][0]["kind"] == "code"
    assert (Path(database).parent / "kb.db.index").is_dir()  # the index cache next to the DB


def test_attribute_by_sha256_and_text(corpus: DemoCorpus, database: str) -> None:
    runner = CliRunner()
    stored = corpus.binary("bravo-v1", "O2")
    sha256 = json.loads(runner.invoke(
        cli, ["attribute", "--db", database, str(stored.path), "--format", "json"]
    ).output)["sha256"]
    result = runner.invoke(cli, ["attribute", "--db", database, sha256])
    assert result.exit_code == 0, result.output
    assert "verdict: Group B" in result.output
    delta_path = str(corpus.binary("delta", "O2").path)
    delta = runner.invoke(cli, ["attribute", "--db", database, delta_path])
    assert "verdict: no known actor" in delta.output


def test_attribute_exports_stix_and_misp(corpus: DemoCorpus, database: str) -> None:
    runner = CliRunner()
    query = str(corpus.binary("alpha-v3", "O2").path)
    stix = json.loads(runner.invoke(
        cli, ["attribute", "--db", database, query, "--format", "stix"]
    ).output)
    assert stix["type"] == "bundle"
    misp = json.loads(runner.invoke(
        cli, ["attribute", "--db", database, query, "--format", "misp"]
    ).output)
    assert "Event" in misp


def test_usage_errors_have_exit_code_2(database: str, tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["attribute", "--db", database, "f" * 64]).exit_code == 2
    assert runner.invoke(cli, ["attribute", "--db", database, "nothing-here"]).exit_code == 2
    assert runner.invoke(cli, ["attribute", "--db", database]).exit_code == 2
    not_a_sample = tmp_path / "text.bin"
    not_a_sample.write_text("hello")
    result = runner.invoke(cli, ["attribute", "--db", database, str(not_a_sample)])
    assert result.exit_code == 13  # UnsupportedFormatError, mapped by the one CLI handler


def test_compare_json(corpus: DemoCorpus, database: str) -> None:
    a, b = corpus.binary("alpha-v2", "O2").path, corpus.binary("charlie", "O2").path
    result = CliRunner().invoke(cli, ["compare", "--db", database, str(a), str(b),
                                      "--json", "--top", "2"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert all(len(f["candidates"]) <= 2 for f in document["functions"])
    assert len(document["shared"]) >= 4
    text = CliRunner().invoke(cli, ["compare", "--db", database, str(a), str(b)])
    assert "shared functions:" in text.output


@pytest.mark.slow
def test_earmark_demo_runs_as_a_real_process(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    result = subprocess.run(
        [sys.executable, "-c", "from earmark.cli import main; main()", "demo",
         "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "query alpha-v3" in result.stdout and "verdict: Group A" in result.stdout
    assert "query delta" in result.stdout and "verdict: no known actor" in result.stdout


def test_attribute_iocs_without_a_sample_keeps_the_contract(database: str, tmp_path: Path) -> None:
    iocs = tmp_path / "incident.txt"
    iocs.write_text("C2 at update-check.example-cdn.net and 203.0.113.77\n")
    result = CliRunner().invoke(
        cli, ["attribute", "--db", database, "--iocs", str(iocs), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["sha256"] is None
    assert document["query"]["indicator_count"] >= 1
    assert all(item["kind"] == "infrastructure" for item in document["evidence"])
    assert document["verdict"]["actor"] is None  # the KB has no intel to link them to
