"""Releasing LIEF's disassembler enums: analysis unchanged, (dis)assembly refused, idempotent.

Run in a child interpreter: the release changes the process's LIEF for good."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fixtures.build import FixtureBuilder

_CHILD = r"""
import dataclasses, hashlib, json, sys
import lief
from earmark.extract import analyze_file
from earmark.extract.lief_assembly import LiefAssemblyReleased, release_lief_assembly
from earmark.freeze import features_to_bytes

def digest(path):
    features = dataclasses.replace(analyze_file(path), analysis_seconds=0.0)
    return hashlib.sha256(features_to_bytes(features)).hexdigest()

paths = sys.argv[1:]
before = [digest(path) for path in paths]
members_before = len(lief.assembly.x86.OPCODE.__members__)
released = release_lief_assembly()
refused = []
for binary in (lief.parse(paths[0]), lief.parse(paths[1])):
    try:
        list(binary.disassemble(0))
    except LiefAssemblyReleased:
        refused.append(type(binary).__module__ + "." + type(binary).__name__)
print(json.dumps({
    "same": before == [digest(path) for path in paths],
    "members_before": members_before,
    "released": released,
    "x86_members_after": len(lief.assembly.x86.OPCODE.__members__),
    "second_release": release_lief_assembly(),
    "refused": refused,
}))
"""


def test_release_keeps_analysis_and_refuses_disassembly(builder: FixtureBuilder) -> None:
    paths = [
        builder.build("fx_codec.c", "gcc64", "O2").stripped,
        builder.build("fx_codec.c", "mingw64", "O2").stripped,
    ]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).parent,
    )
    outcome = json.loads(child.stdout.strip().splitlines()[-1])
    assert outcome["same"]  # features byte-identical before and after the release
    assert outcome["members_before"] > 10_000
    assert outcome["released"] > outcome["members_before"]  # every architecture's enums
    assert outcome["x86_members_after"] == 0
    assert outcome["second_release"] == 0
    assert len(outcome["refused"]) == 2  # ELF and PE binaries both refuse to disassemble
