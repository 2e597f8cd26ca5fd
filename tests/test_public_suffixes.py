"""The shared public-suffix parser: private suffixes on request, tldextract loaded on first use."""

from __future__ import annotations

import subprocess
import sys

from earmark.intel.public_suffixes import HostParts, host_parts


def test_private_suffixes_count_only_when_asked() -> None:
    assert host_parts("a.b.blogspot.com") == HostParts("com", "blogspot", "blogspot.com")
    assert host_parts("a.b.blogspot.com", private=True) == HostParts(
        "blogspot.com", "b", "b.blogspot.com"
    )
    assert host_parts("co.uk") == HostParts("co.uk", "", "")
    assert host_parts("kernel32.dll") == HostParts("", "dll", "")


def test_tldextract_is_imported_on_the_first_lookup_only() -> None:
    # A fresh interpreter: this one has imported it already.
    code = (
        "import sys\n"
        "import earmark.correlate.infrastructure, earmark.intel.indicators as i\n"
        "assert 'tldextract' not in sys.modules, 'imported with the modules'\n"
        "assert i.extract_indicators('no host here 1.2') == []\n"
        "assert 'tldextract' not in sys.modules, 'imported without a domain candidate'\n"
        "assert [x.value for x in i.extract_indicators('see evil.co.uk')] == ['evil.co.uk']\n"
        "assert 'tldextract' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
