"""Indicator extraction: what must be found, and the look-alikes that must not be."""

from __future__ import annotations

import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.intel import indicators, public_suffixes
from earmark.intel.indicators import (
    classify_value,
    extract_indicators,
    indicators_from_strings,
    refang,
)
from earmark.model.intel import IndicatorType as T
from earmark.model.sample import StringRef


def found(text: str) -> list[tuple[str, str]]:
    return [(i.type.value, i.value) for i in extract_indicators(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("C2: 185.10.68.97", [("ipv4", "185.10.68.97")]),
        ("internal pivot 10.1.2.3", [("ipv4", "10.1.2.3")]),  # private kept on purpose
        ("beacon to 2001:4860:4860::8888 now", [("ipv6", "2001:4860:4860::8888")]),
        ("evil-update.co.uk", [("domain", "evil-update.co.uk")]),
        ("GET hxxps://cdn-evil[.]com/a/b.php?id=1.", [
            ("url", "https://cdn-evil.com/a/b.php?id=1"), ("domain", "cdn-evil.com")]),
        ("http://203.0.114.5:8080/x", [("url", "http://203.0.114.5:8080/x"),
                                       ("ipv4", "203.0.114.5")]),
        ("mail to ops[@]mail-evil[.]ru", [("email", "ops@mail-evil.ru")]),
        ("1.2.3[.]4", [("ipv4", "1.2.3.4")]),
        ("evil[dot]com and bad(.)net and x{.}org", [
            ("domain", "evil.com"), ("domain", "bad.net"), ("domain", "x.org")]),
        ("hxxp[:]//evil[.]com/p", [("url", "http://evil.com/p"), ("domain", "evil.com")]),
        ("1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa", [("bitcoin", "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa")]),
        ("3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy", [("bitcoin", "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy")]),
        ("bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq",
         [("bitcoin", "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq")]),
        ("expyuzz4wqqyqhjn.onion", [("onion", "expyuzz4wqqyqhjn.onion")]),
        ("2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion",
         [("onion", "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion")]),
        (r"\\.\pipe\MSSE-1234-server", [("named-pipe", r"\\.\pipe\msse-1234-server")]),
        (r'"\\\\.\\pipe\\postex_ab12"', [("named-pipe", r"\\.\pipe\postex_ab12")]),
        (r"Global\Mtx_Xy12 and Local\{ABCD-12}",
         [("mutex", r"Global\Mtx_Xy12"), ("mutex", r"Local\{ABCD-12}")]),
        ("Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; rv:11.0) like Gecko\n",
         [("user-agent", "Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; rv:11.0) like Gecko")]),
        ("44D88612FEA8A8F36DE82E1278ABB02F", [("md5", "44d88612fea8a8f36de82e1278abb02f")]),
        ("sha1 3395856ce81f2b7382dee72602f798b642f14140",
         [("sha1", "3395856ce81f2b7382dee72602f798b642f14140")]),
        ("evil.com:443", [("domain", "evil.com")]),
        ("onet[.]pl", [("domain", "onet.pl")]),  # defanged: meant as a domain
        ("Microsoft.com", [("domain", "microsoft.com")]),
    ],
)
def test_true_positives(text: str, expected: list[tuple[str, str]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "version 1.2.3.4", "Version: 10.0.1.2", "v1.0.0.1", "ver 2.1.0.3", "build 4.3.2.1",
        "FileVersion 6.1.7601.17514",
        "127.0.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.251", "169.254.1.1",
        "192.0.2.1", "01.02.03.04", "1.2.3.256", "1.3.6.1.4.1.311.2.1.21", "OID 2.5.4.3",
        "1.2.840.113549.1.1.11", "3.14159", "12.34.56",
        "kernel32.dll", "a.exe", "setup.msi", "main.py", "README.md", "install.sh",
        "photo.zip", "lib.rs", "System.Net", "System.IO", "window.top", "this.name",
        "self.info", "Foo.Bar", "x.y", "localhost", "co.uk",
        "::1", "fe80::1", "12:34:56", "std::string", "00:1a:2b:3c:4d:5e", "a::b",
        "00000000000000000000000000000000", "12345678901234567890123456789012",
        "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNb",  # checksum broken
        "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdr",  # checksum broken
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.onion",  # v3 bad checksum
        "user@localhost", "http://localhost/x", "http://127.0.0.1/admin",
        "deadbeefcafe", "Mozilla Firefox",
    ],
)
def test_false_positives(text: str) -> None:
    assert found(text) == []


def test_refang() -> None:
    assert refang("hxxps://a[.]b[.]com[/]") == "https://a.b.com[/]"
    assert refang("x[at]y[.]org") == "x@y.org"
    assert refang("fxp://files(.)evil(.)net") == "ftp://files.evil.net"
    assert refang("plain text 1.2.3.4") == "plain text 1.2.3.4"


def test_offsets_are_original_positions() -> None:
    text = "aa hxxp://evil[.]com/x bb 8.8.8.8"
    indicators = extract_indicators(text, offset_base=100)
    by_type = {i.type: i.offset for i in indicators}
    assert by_type[T.URL] == 100 + text.index("hxxp")
    assert by_type[T.DOMAIN] == 100 + text.index("evil")
    assert by_type[T.IPV4] == 100 + text.index("8.8.8.8")
    assert all(i.offset is None for i in extract_indicators(text))


def test_strings_keep_file_offsets() -> None:
    strings = [StringRef(0x400, "ascii", "connect 8.8.4.4"),
               StringRef(0x800, "utf-16le", "http://evil.com/gate.php")]
    indicators = indicators_from_strings(strings)
    assert [(i.type, i.value, i.offset) for i in indicators] == [
        (T.IPV4, "8.8.4.4", 0x400 + 8),
        (T.URL, "http://evil.com/gate.php", 0x800),
        (T.DOMAIN, "evil.com", 0x800 + 2 * len("http://")),
    ]


def test_classify_value_trusts_a_list_cell() -> None:
    cell = classify_value("setup.py")  # a domain column may hold what looks like a file name
    assert cell is not None and cell.type is T.DOMAIN
    url = classify_value("hxxp://a[.]b.com/Path")
    assert url is not None and url.value == "http://a.b.com/Path"
    assert classify_value("not an indicator") is None


def test_no_network_during_extraction(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # Built again under the block, whatever earlier tests left in the per-process caches.
    public_suffixes._table.cache_clear()
    public_suffixes.host_parts.cache_clear()
    assert found("visit evil.example.co.jp") == [("domain", "evil.example.co.jp")]


def test_long_text_is_fast() -> None:
    import time

    line = ("GET /index.html HTTP/1.1 Host: cdn.evil.com from 45.77.1.2 version 1.2.3.4 "
            "kernel32.dll System.Net \\\\.\\pipe\\x 44d88612fea8a8f36de82e1278abb02f\n")
    text = line * 5000  # ≈0.6 MB
    started = time.perf_counter()
    indicators = extract_indicators(text)
    elapsed = time.perf_counter() - started
    assert len(indicators) == 5000 * 4
    assert elapsed < 5.0


@pytest.mark.parametrize(
    "text",
    [
        "1IIIIIIIIIIIIIIIIIIIIIIIIIIIIII",  # excluded Base58 letters must not crash the check
        "anon.86d46c58b0185e052a62e8a10d3add5f.13.llvm.1849637444694865207",
        "/rustc/897e37553bba8b42751c67658967889d11ecd120/library/core/src/fmt/mod.rs",
    ],
)
def test_binary_string_noise(text: str) -> None:
    assert found(text) == []


@given(st.text(alphabet=st.sampled_from("13bcAIO0lx.:/\\[]@-_ hxtpsGlobalpie4568"), max_size=120))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_never_raises(text: str) -> None:
    for indicator in extract_indicators(text, offset_base=0):
        assert indicator.offset is not None and 0 <= indicator.offset <= len(text)


# Characters and pieces every alternative starts from, plus look-alikes that case folding
# matches (Kelvin sign, long s), so generated text reaches each rule.
_PIECES = st.sampled_from(
    ["a", "Z", "0", "7", "f", "\u212a", "\u017f", " ", "_", "-", "/", ".", ":", "@", "\\", "[",
     "(", "{", "]", "bc1", "hxxp", "Global", "Mozilla", "evil", "com", "1A1zP1eP5QGefi2DMPTfTL5SL",
     "qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq", "44d88612fea8a8f36de82e1278abb02f"]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
def test_the_precheck_never_hides_an_indicator(text: str) -> None:
    assert list(indicators._scan(text)) == list(indicators._scan_text(text))


def test_case_folded_letters_are_no_bech32_address() -> None:
    # "ſ" (long s) matches "s" under Unicode case-insensitive matching; the checksum test must
    # answer "no address" for it instead of raising.
    text = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq\u017f"
    assert list(indicators._scan(text)) == list(indicators._scan_text(text))
    assert not any(i.value.endswith("\u017f") for i, _ in indicators._scan_text(text))


# Pieces that make each alternative possible or not: the "://", "@", backslash, dot and colon
# each alternative needs, runs long enough for hashes and wallets, and non-ASCII letters that
# case folding matches ("ı" and "i", "K" and "k", "ſ" and "s").
_NEED_PIECES = st.sampled_from(
    ["a", "k", "0", "8", ".", ":", "@", "://", "\\", "\\\\.\\pipe\\", "Global\\", "pipe",
     "Mozilla/5.0 (x)", "moz\u0131lla/", "\u212a", "\u017f", "http", "evil.com", "10.1.2.3",
     "bc1", "qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq", "44d88612fea8a8f36de82e1278abb02f",
     "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa", "[.]", "hxxp", " ", "Local\\", "SESSION\\1\\", "PIPE\\",
     "x@y", "A", "Z", "-", "5", "F", "BC1", "44D88612FEA8A8F36DE82E1278ABB02F"]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(_NEED_PIECES, max_size=14).map("".join))
def test_left_out_alternatives_change_no_match(text: str) -> None:
    scanned = list(indicators._scan_text(text))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(indicators, "_candidate_pattern", lambda possible: indicators._CANDIDATE)
        assert scanned == list(indicators._scan_text(text))


_DEFANG_PIECES = st.sampled_from(
    ["a", "x", "h", "p", "s", ".", ":", "/", "@", "\\", "[", "]", "(", ")", "{", "}", " ", "\t",
     "hxxp", "hXXp", "h**p", "meow", "fxp", "[.]", "(dot)", "{at}", "[:]", "[://]", "\\.", "d",
     "at", "dot", "\u212a", "\u017f", "HXTP", "MeOw", "FXP", "[D]", "{DoT}", "(AT)", "(@)", "{.}"]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(_DEFANG_PIECES, max_size=14).map("".join))
def test_text_without_defang_marks_is_not_scanned_for_them(text: str) -> None:
    refanged = indicators._refang_with_map(text)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(indicators, "_DEFANG_CHARACTER", re.compile(""))  # every text is scanned
        patch.setattr(indicators, "_DEFANG_MARK", re.compile(""))
        assert refanged == indicators._refang_with_map(text)
