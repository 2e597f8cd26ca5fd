"""``earmark intel import/export/search`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pymisp import MISPEvent

from earmark.cli import cli
from shared_data import INTEL_DIR

stix2validator = pytest.importorskip("stix2validator")

INTEL = INTEL_DIR
ESET_LAZARUS = INTEL / "eset_malware-ioc" / "nukesped_lazarus"
pytestmark = pytest.mark.skipif(not INTEL.is_dir(), reason="shared intel data not present")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def database(tmp_path: Path) -> str:
    path = str(tmp_path / "kb.db")
    code, out, _ = run("intel", "import", "--db", path, str(ESET_LAZARUS))
    assert code == 0, out
    return path


def test_import_reports_counts_and_reimport_changes_nothing(database: str) -> None:
    code, out, _ = run("intel", "import", "--db", database, str(ESET_LAZARUS))
    assert code == 0
    assert "0 new, 0 updated" in out and "failed files: 0" in out


def test_csv_with_mapping_and_tlp(database: str, tmp_path: Path) -> None:
    table = tmp_path / "iocs.csv"
    table.write_text("seen,group,ioc\n2024-02-01,Hidden Cobra,bluefrog-mail.net\n",
                     encoding="utf-8")
    code, out, err = run("intel", "import", "--db", database, "--mapping",
                         "value=ioc,actor=group,date=seen", "--tlp", "amber+strict",
                         "--source", "partner feed", str(table))
    assert code == 0, err
    code, out, _ = run("intel", "search", "--db", database, "--json", "bluefrog-mail.net")
    result = json.loads(out)
    assert {(h["pivot"], h["actor"]) for h in result["hits"]} == {
        ("domain", "Lazarus Group"), ("registered-domain", "Lazarus Group")}
    assert result["reports"][0]["tlp"] == "amber+strict"
    assert result["reports"][0]["source"] == "partner feed"
    assert result["reports"][0]["published"] == "2024-02-01"


def test_search_by_alias_text_and_json(database: str) -> None:
    code, out, _ = run("intel", "search", "--db", database, "Hidden Cobra")
    assert code == 0 and "actor: Lazarus Group" in out and "3CX supply-chain" in out
    code, out, _ = run("intel", "search", "--db", database, "--json", "Hidden Cobra")
    result = json.loads(out)
    assert result["actor"] == "Lazarus Group"
    assert any(r["title"] == "3CX supply-chain compromise" for r in result["reports"])
    code, out, _ = run("intel", "search", "--db", database, "nothing-here-at-all.bluefrog.net")
    assert code == 0 and "nothing in the knowledge base" in out


def test_export_stix_and_misp_withhold_red(database: str, tmp_path: Path) -> None:
    secret = tmp_path / "red.txt"
    secret.write_text("secret-partner-c2.bluefrog.net\n", encoding="utf-8")
    assert run("intel", "import", "--db", database, "--tlp", "red", str(secret))[0] == 0
    out_file = tmp_path / "bundle.json"
    code, _, _ = run("intel", "export", "--db", database, "--actor", "Lazarus Group",
                     "-o", str(out_file))
    assert code == 0
    text = out_file.read_text(encoding="utf-8")
    assert stix2validator.validate_string(text).is_valid
    assert "secret-partner-c2" not in text
    code, out, _ = run("intel", "export", "--db", database, "--format", "misp")
    assert code == 0 and "secret-partner-c2" not in out
    for document in json.loads(out)["response"]:
        MISPEvent().load(document)
    code, out, _ = run("intel", "export", "--db", database, "--format", "misp", "--include-red")
    assert "secret-partner-c2" in out


def test_user_errors_have_exit_codes(database: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    code, _, err = run("intel", "import", "--db", database, str(broken))
    assert code == 40 and "not valid JSON" in err
    code, _, err = run("intel", "import", "--db", database, "--mapping", "colour=1",
                       str(broken))
    assert code == 2 and "mapping" in err
    code, _, _ = run("intel", "import", "--db", database, "--tlp", "purple", str(broken))
    assert code == 2
    code, _, err = run("intel", "search", "--db", str(tmp_path / "no" / "kb.db"), "x")
    assert code == 30
