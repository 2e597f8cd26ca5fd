"""`earmark analyze` through click's CliRunner and once through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import earmark
from earmark.cli import cli
from earmark.errors import EmptyFileError, InputError, UnsupportedFormatError
from earmark.freeze import load_features
from fixtures.build import FixtureBuilder


@pytest.fixture(scope="module")
def good_pe(builder: FixtureBuilder) -> Path:
    return builder.build("meta_hello.c", "mingw64", "O2").stripped


@pytest.fixture()
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"just some text, not a program\n")
    return path


def test_json_lines_for_a_mixed_batch(good_pe: Path, bad_file: Path) -> None:
    result = CliRunner().invoke(cli, ["analyze", "--json", str(good_pe), str(bad_file)])
    assert result.exit_code == UnsupportedFormatError.exit_code
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    good, bad = lines
    assert good["error"] is None and good["format"] == "pe" and good["arch"] == "x86_64"
    assert good["bits"] == 64 and len(good["sha256"]) == 64
    assert good["functions"] and {"address", "size"} <= set(good["functions"][0])
    assert good["pe"]["imphash"]
    assert bad["error"] and bad["error_type"] == "UnsupportedFormatError" and bad["sha256"]
    assert "analysed 1, failed 1" in result.stderr
    assert "Traceback" not in result.output


def test_human_summary(good_pe: Path) -> None:
    result = CliRunner().invoke(cli, ["analyze", str(good_pe)])
    assert result.exit_code == 0, result.output
    for expected in (
        "sha256",
        "imphash",
        "rich header",
        "sections",
        ".text",
        "analysed 1, failed 0",
    ):
        assert expected in result.stdout


def test_mixed_failure_kinds_exit_with_the_generic_input_code(
    bad_file: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    result = CliRunner().invoke(cli, ["analyze", str(empty)])
    assert result.exit_code == EmptyFileError.exit_code
    result = CliRunner().invoke(cli, ["analyze", str(empty), str(bad_file)])
    assert result.exit_code == InputError.exit_code
    assert "failed 2" in result.stdout


def test_output_directory_and_single_file(good_pe: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "frozen"
    result = CliRunner().invoke(cli, ["analyze", "--json", str(good_pe), "-o", str(out_dir)])
    assert result.exit_code == 0
    sha256 = json.loads(result.stdout.splitlines()[0])["sha256"]
    assert load_features(out_dir / f"{sha256}.emf").sha256 == sha256
    single = tmp_path / "one.emf"
    assert CliRunner().invoke(cli, ["analyze", str(good_pe), "-o", str(single)]).exit_code == 0
    assert load_features(single).sha256 == sha256
    result = CliRunner().invoke(cli, ["analyze", str(good_pe), str(good_pe), "-o", str(single)])
    assert result.exit_code == 2 and "names one file" in result.output


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and earmark.__version__ in result.stdout


def test_installed_console_script(good_pe: Path, bad_file: Path) -> None:
    script = Path(sys.executable).with_name("earmark")
    executable = str(script) if script.exists() else shutil.which("earmark")
    if executable is None:
        pytest.skip("the earmark console script is not installed")
    missing = bad_file.with_name("missing.exe")
    run = subprocess.run(
        [executable, "analyze", str(good_pe), str(bad_file), str(missing)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == InputError.exit_code  # two different failure kinds
    assert "analysed 1, failed 2" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
