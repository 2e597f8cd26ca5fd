"""Indicators of compromise found in text or in a sample's strings.

``extract_indicators`` runs one compiled alternation over the (refanged) text, left to right, and
validates each candidate with the rule of its type: ``ipaddress`` for IPs, the public-suffix list
(``intel.public_suffixes``, no network) for domains, Base58Check / bech32 checksums for
Bitcoin, the v3 checksum for .onion. Then it rejects look-alikes that fill reports and binaries:
version numbers, OIDs, file names whose extension is also a top-level domain (``main.py``,
``README.md``), code identifiers (``System.Net``, ``window.top``).

Decisions worth knowing (also in docs/intel.md):
- IP addresses: loopback, unspecified, multicast, link-local, reserved and documentation ranges are
  dropped (never infrastructure). Private RFC 1918 addresses are kept: implants carry internal C2
  and pivot addresses, and the warninglists step downstream decides what is common.
- A URL also yields its host (domain or IP) as its own indicator, at the host's offset, because
  infrastructure is correlated on hosts.
- Text that was defanged (``evil[.]com``) is an indicator on purpose; look-alike rejection is
  skipped for it.
- Monero addresses are checked for prefix, alphabet and length only: the checksum needs
  Keccak-256, which the standard library does not have (hashlib's sha3_256 pads differently).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
import itertools
import re
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from earmark.intel.public_suffixes import host_parts
from earmark.model.intel import Indicator, IndicatorType
from earmark.model.sample import StringRef

__all__ = ["classify_value", "extract_indicators", "indicators_from_strings", "refang"]

# -- refanging ------------------------------------------------------------------------------------

# Each defanging habit seen in vendor reports, and what it stands for.
_DEFANG_PATTERN = re.compile(
    r"(?P<scheme>\b(?:hxxp|hXXp|hxtp|h\*\*p|meow)(?=s?(?:\[?:|://)))"
    r"|(?P<ftp>\bfxp(?=s?(?:\[?:|://)))"
    r"|(?P<sep>\[://\]|\(://\)|\[:\]//|\[:/\]/|\[:\]|\(:\))"
    r"|(?P<dot>\s?(?:\[\.\]|\(\.\)|\{\.\}|\[dot\]|\(dot\)|\{dot\}|\[d\]|(?<!\\)\\\.(?!\\))\s?)"
    r"|(?P<at>\s?(?:\[@\]|\(@\)|\{@\}|\[at\]|\(at\)|\{at\})\s?)",
    re.IGNORECASE,
)
_REPLACEMENT = {"scheme": "http", "ftp": "ftp", "sep": ":", "dot": ".", "at": "@"}


# What every defanging form holds: its bracketed dot, colon or at ("[.", "(:", "{@", "[d]",
# "(dot)", "{at}"), an escaped dot, or its scheme word. Text without any is left as it is
# without the scan: the looser test of one bracket, colon or backslash let 21.6k of the PE
# bench (a) KB's 51k scanned strings through, 115 of them defanged, and the scans cost ~0.07
# of the indicator search's ~0.2 CPU s.
_DEFANG_MARK = re.compile(
    r"[\[({](?:[.:@]|d(?:ot)?[\]})]|at[\]})])|\\\.|h(?:xx|xt|\*\*)p|meow|fxp", re.IGNORECASE
)
# What the marks above need at least (a scheme word is only a form before a colon), tested
# first because one character class scans several times faster than those alternatives.
_DEFANG_CHARACTER = re.compile(r"[:\[({\\]")


def _refang_with_map(text: str) -> tuple[str, list[int] | None]:
    """Refanged text and, when anything changed, the original index of each output character."""
    if _DEFANG_CHARACTER.search(text) is None or _DEFANG_MARK.search(text) is None:
        return text, None
    pieces: list[str] = []
    index_map: list[int] = []
    last = 0
    for match in _DEFANG_PATTERN.finditer(text):
        kind = match.lastgroup or "dot"
        replacement = _REPLACEMENT[kind]
        if kind == "sep" and "//" in match.group(0):
            replacement = "://"
        pieces.append(text[last : match.start()])
        index_map.extend(range(last, match.start()))
        pieces.append(replacement)
        index_map.extend([match.start()] * len(replacement))
        last = match.end()
    if not pieces:
        return text, None
    pieces.append(text[last:])
    index_map.extend(range(last, len(text)))
    index_map.append(len(text))  # one past the end, so a span's end maps too
    return "".join(pieces), index_map


def refang(text: str) -> str:
    """``hxxps://evil[.]com`` → ``https://evil.com``; text without defanging comes back as is."""
    return _refang_with_map(text)[0]


# -- candidates -----------------------------------------------------------------------------------

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = rf"(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{1,59}})"
_BASE58 = "1-9A-HJ-NP-Za-km-z"
_BECH32 = "ac-hj-np-z02-9"

# The alternatives, tried at each position in this order; the first that matches wins, so URLs
# and e-mail addresses are taken whole before their hosts could match as domains.
_ALTERNATIVES = {
    "url": r"\b(?:https?|ftp)://[^\s\"'<>\x00-\x1f\\`^{}|]{3,2048}",
    "email": rf"(?<![\w.+-])[a-z0-9][a-z0-9._%+-]{{0,63}}@{_DOMAIN}(?![\w-]|\.[a-z0-9])",
    "pipe": r"\\{2,4}\.\\{1,2}pipe\\{1,2}[^\s\\\"'<>|\x00-\x1f]{1,256}",
    "mutex": r"(?<![\w\\])(?:Global|Local|Session\\{1,2}\d{1,3})\\{1,2}"
    # Spaces are legal in object names but end the match: in text they end the name far more
    # often than they belong to it.
    r"[A-Za-z0-9_.{}@#$~+=-]{3,128}",
    "useragent": r"\bMozilla/\d\.\d \([^()\r\n\x00-\x1f]{3,200}\)[^\r\n\"\x00-\x1f]{0,300}",
    "ipv4": r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)",
    "ipv6": r"(?<![\w:.])(?:[0-9a-f]{0,4}:){2,7}(?:[0-9a-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
    r"(?![\w:])",
    # Not inside dotted or slashed names: "anon.<md5>.13.llvm" symbols, "/rustc/<sha1>/" paths.
    "hash": r"(?<![\w./])(?:[0-9a-f]{64}|[0-9a-f]{40}|[0-9a-f]{32})(?!\w|\.\w|/)",
    "domain": rf"(?<![\w.@-]){_DOMAIN}(?![\w-]|\.[a-z0-9])",
    "bech32": rf"(?<!\w)bc1[{_BECH32}]{{11,71}}(?!\w)",
    # Base58 is case-sensitive (it leaves out 0, O, I and l): the whole regex ignores case, so
    # these two switch it off.
    "monero": rf"(?-i:(?<!\w)[48][0-9AB][{_BASE58}]{{93}}(?!\w))",
    "base58": rf"(?-i:(?<!\w)[13][{_BASE58}]{{25,34}}(?!\w))",
}
_CANDIDATE = re.compile(
    "|".join(f"(?P<{name}>{pattern})" for name, pattern in _ALTERNATIVES.items()),
    re.IGNORECASE,
)


# What each alternative cannot match without, as one of five marks of a text: "://" or two
# colons (url, ipv6), an "@" and a dot (email), a backslash after "pipe", "global", "local" or
# "session" (pipe, mutex), a dot between letters or digits (useragent's "5.0", ipv4, domain),
# or a run of 26 letters and digits (hash 32+, base58 26+, monero 95) or "bc1" (bech32).
# Marks this close to each alternative let most strings of a binary skip the alternation:
# C++ names hold "@" without a dot, paths a backslash, messages a full stop; over the strings
# of the PE bench (a) KB the search took 0.17 CPU s with one character or the length as marks.
_MARK_OF = {"url": 0, "ipv6": 0, "email": 1, "pipe": 2, "mutex": 2, "useragent": 3, "ipv4": 3,
            "domain": 3, "hash": 4, "bech32": 4, "monero": 4, "base58": 4}
_LONG_TEXT = 26  # the shortest base58 address; hashes and monero are longer
_LONG_RUN = re.compile(rf"[0-9A-Za-z]{{{_LONG_TEXT}}}")
_DOTTED = re.compile(r"[0-9A-Za-z]\.[0-9A-Za-z]")
_OBJECT_PREFIXES = ("pipe\\", "global\\", "local\\", "session\\")


def _marks(text: str) -> tuple[bool, bool, bool, bool, bool]:
    """The marks of an ASCII text (see _MARK_OF); Unicode case folding ("ſ" matches "s")
    is why non-ASCII text gets the whole alternation instead."""
    lowered = text.lower()
    return (
        "://" in text or text.count(":") >= 2,
        "@" in text and "." in text,
        "\\" in text and any(prefix in lowered for prefix in _OBJECT_PREFIXES),
        "." in text and _DOTTED.search(text) is not None,
        (len(text) >= _LONG_TEXT and _LONG_RUN.search(text) is not None) or "bc1" in lowered,
    )


@functools.cache
def _candidate_pattern(marks: tuple[bool, ...]) -> re.Pattern[str] | None:
    """The alternation of the alternatives a text with these marks may hold, in their order
    (None: none). Leaving out one that cannot match anywhere in the text changes no match, and
    each tried at every position costs: over the strings of the 130 corpus PE files <= 1 MB
    (67k texts pass the precheck, 1.4 M characters) the whole alternation took 0.38 CPU s,
    these 0.15 s. 31 patterns, ~25 ms to compile them all."""
    parts = [
        f"(?P<{name}>{pattern})"
        for name, pattern in _ALTERNATIVES.items()
        if marks[_MARK_OF[name]]
    ]
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def compile_patterns() -> None:
    """Compile every candidate alternation now rather than on first use: a process about to
    fork workers calls it so that they share the patterns instead of each compiling them."""
    for marks in itertools.product((False, True), repeat=max(_MARK_OF.values()) + 1):
        _candidate_pattern(marks)


# Each alternative alone, to classify a whole value (one cell of an IOC list).
_WHOLE_VALUE = {name: re.compile(p, re.IGNORECASE) for name, p in _ALTERNATIVES.items()}

# Trailing characters that close a sentence or a bracket around a URL, not part of it.
_URL_TRAILING = ".,;:!?)]}'\"*>"

# Context just before a dotted quad that makes it a version, not an address.
_VERSION_CONTEXT = re.compile(
    r"(?:\bversion|\bver|\bv|\bbuild|\brelease|\brev|\bfirmware|\bfile ?version|\boid)"
    r"[\s:=#._/-]{0,3}$",
    re.IGNORECASE,
)
_VERSION_CONTEXT_WINDOW = 16  # characters looked at before an IPv4 candidate

# Dotted quads that are ASN.1 object identifiers seen as text in certificates and reports.
_OID_PREFIXES = ("1.2.840.", "1.3.6.1", "2.5.4.", "2.5.29.", "2.16.840.")

# Top-level domains that are also common file extensions. "main.py" or "README.md" without a
# subdomain is a file name far more often than a domain in strings and reports.
_FILE_EXTENSION_TLDS = frozenset(
    {"py", "md", "sh", "pl", "rs", "ps", "so", "cc", "cs", "zip", "mov", "pm", "mo", "cat", "sc",
     "ml", "ts", "bz", "gz", "js", "db", "ini", "log", "cfg", "bat", "exe", "dll", "sys"}
)
# First labels of code identifiers that parse as domains: .NET namespaces, JavaScript objects.
_CODE_ROOTS = frozenset(
    {"system", "microsoft", "windows", "java", "javax", "android", "mono", "this", "self",
     "window", "document", "parent", "top", "console", "math", "std", "object", "string", "array"}
)
_CODE_ROOTS_ALLOWED_TLDS = frozenset({"com"})  # microsoft.com, windows.com are real domains

# Hex strings of hash length that are padding or placeholders, not file hashes.
_BORING_HEX = re.compile(r"^(?:(.)\1+|[0-9]+|[a-f]+)$", re.IGNORECASE)


def _is_public_domain(name: str) -> bool:
    parts = host_parts(name)
    return bool(parts.suffix) and bool(parts.domain)


def _domain_is_lookalike(original: str, value: str) -> bool:
    labels = value.split(".")
    parts = host_parts(value)
    if len(labels) == 2 and parts.suffix in _FILE_EXTENSION_TLDS:
        return True
    if labels[0] in _CODE_ROOTS and parts.suffix not in _CODE_ROOTS_ALLOWED_TLDS:
        return True
    # "System.Net", "Foo.Info": a Titlecase last label is code; hosts are written in lower case
    # (or, in some reports, all capitals).
    last_label = original.split(".")[-1]
    return last_label[:1].isupper() and last_label[1:].islower()


_ADDRESS_EXCLUDED = ("is_loopback", "is_unspecified", "is_multicast", "is_link_local",
                     "is_reserved")
_DOCUMENTATION_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


def _valid_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)  # rejects leading zeros and octets over 255
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv4Address) and text == "255.255.255.255":
        return None
    if any(getattr(address, flag) for flag in _ADDRESS_EXCLUDED):
        return None
    if any(address in network for network in _DOCUMENTATION_NETWORKS):
        return None
    return address


# -- wallets and onions ---------------------------------------------------------------------------
# Written here rather than taken from a coin library: the checks are a few lines each, and a
# dependency for Base58Check/bech32 alone would pull crypto code we do not otherwise need.

_BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_INDEX = {c: i for i, c in enumerate(_BASE58_ALPHABET)}


def _base58check_ok(text: str) -> bool:
    number = 0
    for char in text:
        if char not in _BASE58_INDEX:
            return False
        number = number * 58 + _BASE58_INDEX[char]
    leading_zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    raw = b"\x00" * leading_zeros + body
    if len(raw) != 25 or raw[0] not in (0x00, 0x05):  # P2PKH, P2SH on mainnet
        return False
    digest = hashlib.sha256(hashlib.sha256(raw[:-4]).digest()).digest()
    return digest[:4] == raw[-4:]


_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_SET = frozenset(_BECH32_CHARSET)
_BECH32_CONSTANTS = (1, 0x2BC830A3)  # BIP-173 bech32, BIP-350 bech32m


def _bech32_ok(text: str) -> bool:
    if text != text.lower() and text != text.upper():
        return False
    text = text.lower()
    hrp, data = text[:2], text[3:]
    # The patterns match case-insensitively, and Unicode case folding lets a few non-ASCII
    # letters through ("ſ" matches "s", the Kelvin sign "k"): such a text is no address.
    if not _BECH32_SET.issuperset(data):
        return False
    values = [_BECH32_CHARSET.index(c) for c in data]
    generators = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    checksum = 1
    for value in [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for bit, generator in enumerate(generators):
            if (top >> bit) & 1:
                checksum ^= generator
    return checksum in _BECH32_CONSTANTS


_BASE32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def _onion_ok(label: str) -> bool:
    if any(c not in _BASE32_ALPHABET for c in label):
        return False
    if len(label) == 16:  # v2: no checksum exists
        return True
    if len(label) != 56:
        return False
    number = 0
    for char in label:
        number = number * 32 + _BASE32_ALPHABET.index(char)
    raw = number.to_bytes(35, "big")
    public_key, checksum, version = raw[:32], raw[32:34], raw[34:]
    expected = hashlib.sha3_256(b".onion checksum" + public_key + version).digest()[:2]
    return version == b"\x03" and checksum == expected


# -- classification ------------------------------------------------------------------------------


def _classify_domain(original: str, defanged: bool) -> Indicator | None:
    value = original.lower().rstrip(".")
    if value.endswith(".onion"):
        label = value.split(".")[-2]
        return Indicator(IndicatorType.ONION, value) if _onion_ok(label) else None
    if not _is_public_domain(value):
        return None
    if not defanged and _domain_is_lookalike(original, value):
        return None
    return Indicator(IndicatorType.DOMAIN, value)


def _classify_ipv4(text: str, candidate: str, start: int, defanged: bool) -> Indicator | None:
    if _valid_address(candidate) is None:
        return None
    if not defanged:
        before = text[max(0, start - _VERSION_CONTEXT_WINDOW) : start]
        if _VERSION_CONTEXT.search(before) or candidate.startswith(_OID_PREFIXES):
            return None
    return Indicator(IndicatorType.IPV4, candidate)


def _host_indicator(host: str) -> Indicator | None:
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    address = _valid_address(host)
    if address is not None:
        kind = IndicatorType.IPV4 if address.version == 4 else IndicatorType.IPV6
        return Indicator(kind, str(address))
    if host and _is_public_domain(host):
        return Indicator(
            IndicatorType.ONION if host.endswith(".onion") else IndicatorType.DOMAIN, host
        )
    return None


def _classify_url(candidate: str) -> tuple[Indicator, Indicator | None, int] | None:
    """The URL, its host indicator and the host's position inside the URL."""
    candidate = candidate.rstrip(_URL_TRAILING)
    try:
        parts = urlsplit(candidate)
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return None
    host_indicator = _host_indicator(host)
    if host_indicator is None:
        return None
    netloc_start = candidate.find("//") + 2
    host_position = candidate.lower().find(host.split("%")[0], netloc_start)
    scheme, rest = candidate.split("://", 1)
    slash = rest.find("/")
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    value = f"{scheme.lower()}://{authority.lower()}{path}"
    return Indicator(IndicatorType.URL, value), host_indicator, max(host_position, 0)


def _classify(kind: str, candidate: str, text: str, start: int, defanged: bool
              ) -> Iterator[tuple[Indicator, int]]:
    """Indicators of one candidate, each with its position relative to ``start``."""
    lowered = candidate.lower()
    if kind == "url":
        url = _classify_url(candidate)
        if url is not None:
            yield url[0], 0
            if url[1] is not None:
                yield url[1], url[2]
    elif kind == "email":
        domain = lowered.rsplit("@", 1)[1]
        if _is_public_domain(domain):
            yield Indicator(IndicatorType.EMAIL, lowered), 0
    elif kind == "domain":
        indicator = _classify_domain(candidate, defanged)
        if indicator is not None:
            yield indicator, 0
    elif kind == "ipv4":
        indicator = _classify_ipv4(text, candidate, start, defanged)
        if indicator is not None:
            yield indicator, 0
    elif kind == "ipv6":
        if candidate.count(":") >= 2 and candidate.strip(":"):
            address = _valid_address(candidate)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
                yield Indicator(IndicatorType.IPV6, str(address)), 0
    elif kind == "hash":
        if not _BORING_HEX.match(candidate):
            by_length = {32: IndicatorType.MD5, 40: IndicatorType.SHA1, 64: IndicatorType.SHA256}
            yield Indicator(by_length[len(candidate)], lowered), 0
    elif kind == "pipe":
        name = re.split(r"\\+", candidate)[-1]
        yield Indicator(IndicatorType.NAMED_PIPE, "\\\\.\\pipe\\" + name.lower()), 0
    elif kind == "mutex":
        namespace, name = re.split(r"\\+", candidate, maxsplit=1)
        # Kernel object names are case-sensitive, so the value keeps its case.
        yield Indicator(IndicatorType.MUTEX, f"{namespace}\\{name}"), 0
    elif kind == "useragent":
        yield Indicator(IndicatorType.USER_AGENT, candidate.strip()), 0
    elif kind == "bech32":
        if _bech32_ok(candidate):
            yield Indicator(IndicatorType.BITCOIN, lowered), 0
    elif kind == "base58":
        if _base58check_ok(candidate):
            yield Indicator(IndicatorType.BITCOIN, candidate), 0
    elif kind == "monero":
        yield Indicator(IndicatorType.MONERO, candidate), 0


# What every indicator needs somewhere in the text: the punctuation of URLs, addresses, mail,
# pipes, mutexes and defanged forms ("[.]", "(at)", "\."), or a run of 14 word characters (the
# shortest wallet, "bc1" + 11; hashes and Base58 are longer). Half of a sample's strings have
# neither (PE bench queries: 15,000 of 31,500) and skip refanging and the alternation, which cost
# ~8 µs a string.
_MAY_HOLD_INDICATOR = re.compile(r"[.:@\\\[({]|\w{14}")


def _scan(text: str) -> Iterator[tuple[Indicator, int]]:
    """(indicator, position in ``text``) pairs, in order of appearance."""
    if _MAY_HOLD_INDICATOR.search(text) is None:
        return iter(())
    return _scan_text(text)


def _scan_text(text: str) -> Iterator[tuple[Indicator, int]]:
    refanged, index_map = _refang_with_map(text)
    pattern = _candidate_pattern(_marks(refanged)) if refanged.isascii() else _CANDIDATE
    if pattern is None:
        return
    starts = [] if index_map is None else [m.start() for m in _DEFANG_PATTERN.finditer(text)]
    for match in pattern.finditer(refanged):
        kind = match.lastgroup
        if kind is None:
            continue
        start, end = match.span()
        original_start = start if index_map is None else index_map[start]
        defanged = False
        if index_map is not None:
            original_end = index_map[end]
            first = bisect.bisect_left(starts, original_start)
            defanged = first < len(starts) and starts[first] < original_end
        for indicator, relative in _classify(kind, match.group(0), refanged, start, defanged):
            position = start + relative
            yield indicator, position if index_map is None else index_map[position]


def extract_indicators(text: str, offset_base: int | None = None) -> list[Indicator]:
    """Every indicator in ``text``, in order of appearance, duplicates kept.

    With ``offset_base`` each indicator's ``offset`` is ``offset_base`` plus its character
    position in ``text``; without it, offsets stay ``None``.
    """
    return [
        indicator if offset_base is None else
        Indicator(indicator.type, indicator.value, offset_base + position)
        for indicator, position in _scan(text)
    ]


def indicators_from_strings(strings: Sequence[StringRef]) -> list[Indicator]:
    """Indicators in a sample's strings; each offset is the file offset of its first byte."""
    found: list[Indicator] = []
    may_hold_indicator = _MAY_HOLD_INDICATOR.search
    for string in strings:
        # _scan's precheck, here: most strings stop at it, and a call and an empty iterator
        # for each measured 0.114 -> 0.110 CPU s over the PE bench (a) KB strings.
        if may_hold_indicator(string.value) is None:
            continue
        width = 2 if string.encoding == "utf-16le" else 1
        for indicator, position in _scan_text(string.value):
            found.append(Indicator(indicator.type, indicator.value,
                                   string.offset + position * width))
    return found


def classify_value(value: str) -> Indicator | None:
    """The indicator a whole value (one IOC list cell) stands for, or None.

    Used by importers for values already known to be indicators, so look-alike rules that exist
    for free text (version context, file-name TLDs) do not apply: ``setup.py`` in an IOC list's
    domain column is a domain.
    """
    value = value.strip()
    refanged = refang(value)
    for kind, pattern in _WHOLE_VALUE.items():
        if pattern.fullmatch(refanged):
            found = list(_classify(kind, refanged, refanged, 0, defanged=True))
            if found:
                return found[0][0]
    return None
