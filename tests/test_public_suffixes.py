"""The public-suffix split: tldextract's answers on every rule of its list, without tldextract."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tldextract
from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.intel import public_suffixes
from earmark.intel.public_suffixes import HostParts, host_parts

_REFERENCE = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def reference(host: str, private: bool) -> HostParts:
    parts = _REFERENCE(host, include_psl_private_domains=private)
    return HostParts(parts.suffix, parts.domain, parts.top_domain_under_public_suffix)


def _rule_hosts() -> list[str]:
    rules = [
        suffix for suffix, flags in public_suffixes._table().nodes.items()
        if flags & (public_suffixes._PUBLIC_RULE | public_suffixes._PRIVATE_RULE)
    ]
    hosts = []
    for rule in sorted(rules):
        name = rule.replace("*", "wild").lstrip("!")
        hosts += [name, f"x.{name}", f"a.b.{name}", f"A.{name.upper()}."]
    return hosts


@pytest.mark.parametrize("private", [False, True])
def test_every_rule_splits_as_tldextract_splits_it(private: bool) -> None:
    hosts = _rule_hosts()
    assert len(hosts) > 30_000  # the whole list, ICANN and private sections
    mismatched = [h for h in hosts if host_parts(h, private) != reference(h, private)]
    assert mismatched == []


_LABELS = st.sampled_from(
    ["com", "uk", "co", "ck", "www", "jp", "kawasaki", "blogspot", "github", "io", "evil",
     "xn--p1ai", "xn--90a3ac", "xn--zz", "EXAMPLE", "1", "10", "255", "256", "01", "", "*",
     "!www", "a-b", "\u00e9cole", "\u4e2d\u56fd"]
)
_SEPARATORS = st.sampled_from([".", ".", ".", "\u3002", "\uff0e"])


@st.composite
def _names(draw: st.DrawFn) -> str:
    labels = draw(st.lists(_LABELS, min_size=1, max_size=5))
    text = labels[0]
    for label in labels[1:]:
        text += draw(_SEPARATORS) + label
    wrap = draw(st.sampled_from(["{}", "http://{}/path", "user@{}:8080", "//{}", "[{}]", "{}."]))
    return wrap.format(text)


@settings(max_examples=400, deadline=None)
@given(_names(), st.booleans())
def test_any_name_splits_as_tldextract_splits_it(name: str, private: bool) -> None:
    assert host_parts(name, private) == reference(name, private)


@pytest.mark.parametrize(
    "name", ["10.0.0.1", "[2001:db8::1]", "http://[::1]:80/", "256.1.1.1", "01.2.3.4", "a..com"]
)
def test_addresses_and_odd_names_split_as_tldextract_splits_them(name: str) -> None:
    assert host_parts(name) == reference(name, False)


def test_private_suffixes_count_only_when_asked() -> None:
    assert host_parts("a.b.blogspot.com") == HostParts("com", "blogspot", "blogspot.com")
    assert host_parts("a.b.blogspot.com", private=True) == HostParts(
        "blogspot.com", "b", "b.blogspot.com"
    )
    assert host_parts("co.uk") == HostParts("co.uk", "", "")
    assert host_parts("kernel32.dll") == HostParts("", "dll", "")


def test_query_modules_do_not_import_tldextract() -> None:
    # A fresh interpreter: this one has imported it already (as the reference).
    code = (
        "import sys\n"
        "import earmark.correlate.infrastructure, earmark.intel.indicators as i\n"
        "assert [x.value for x in i.extract_indicators('see evil.co.uk')] == ['evil.co.uk']\n"
        "assert 'tldextract' not in sys.modules and 'requests' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
