"""The compiled loops must really be built where a C compiler exists.

tests/test_native.py skips itself when the extension is missing (a machine without gcc still
installs earmark); under CI, which has gcc and the Python headers, that would hide a broken
build, so this check lives outside that module's skip marker.
"""

from __future__ import annotations

import os

import pytest

from earmark.extract import disasm


def test_extension_is_built_under_ci() -> None:
    if os.environ.get("CI") and disasm.ACCELERATOR is None:
        pytest.fail("the _native extension was not built although CI has gcc and Python headers")
