"""Parser for maltrail static trail files (``trails/static/malware/apt_*.txt``).

A file covers one actor. It opens with ``# Aliases: a, b, c`` and then holds blocks, each headed
by one or more ``# Reference: URL`` lines followed by trails (one per line): domains, IPv4
addresses (optionally ``:port`` or ``scheme://``), ``host/path`` URLs and bare ``/paths``.
One block becomes one :class:`IntelReport`.

Trails are typed here rather than by a free-text indicator extractor because the format is
line-oriented and undecorated (no ``http://`` on most URLs, no defanging), and a free-text
extractor would also pick the ``# Reference`` URLs as indicators. Bare paths (``/tbl_add.php``)
are dropped: the model has no indicator type for a path without a host.

Dates: maltrail has none of its own; a block's date is the earliest date found in its reference
URLs (:func:`date_from_reference_url`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from earmark.errors import IntelError
from earmark.model.intel import Indicator, IndicatorType, IntelReport
from earmark.model.kb import Tlp

SOURCE = "maltrail"

# Reference-URL dates outside this window are ids that happen to look like dates.
EARLIEST_PLAUSIBLE_YEAR = 2000
LATEST_PLAUSIBLE_YEAR = 2035
# Twitter/X "snowflake" ids carry a millisecond timestamp since this epoch (2010-11-04).
TWITTER_EPOCH_MS = 1288834974657
# Snowflake ids start above 2^32; smaller status ids are sequential and carry no time.
SMALLEST_SNOWFLAKE = 1 << 32

# Dates must stand alone: inside a hex hash "20190514" is not a date.
_YEAR_MONTH_DAY = re.compile(
    r"(?<![0-9a-z])((?:19|20)\d\d)[/_-]([01]\d)(?:[/_-]([0-3]\d))?(?![0-9a-z])", re.IGNORECASE
)
_COMPACT_DATE = re.compile(r"(?<![0-9a-z])((?:19|20)\d\d)([01]\d)([0-3]\d)(?![0-9a-z])", re.I)
_TWITTER_STATUS = re.compile(r"(?:twitter|x)\.com/[^/]+/status(?:es)?/(\d+)", re.IGNORECASE)
_OTX_PULSE = re.compile(r"otx\.alienvault\.com/pulse/([0-9a-f]{24})", re.IGNORECASE)
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")

ActorResolver = Callable[[str], str]


def date_from_reference_url(url: str) -> date | None:
    """Publication date encoded in a reference URL, if any.

    Understood: ``/2019/05/(14/)`` and ``2019-05-14`` paths, ``20190514`` tokens, Twitter/X
    status ids (snowflake timestamp) and AlienVault OTX pulse ids (MongoDB ObjectId: the first
    four bytes are the creation time in Unix seconds).
    """
    twitter = _TWITTER_STATUS.search(url)
    if twitter:
        status_id = int(twitter.group(1))
        if status_id >= SMALLEST_SNOWFLAKE:
            return _plausible(
                datetime.fromtimestamp(((status_id >> 22) + TWITTER_EPOCH_MS) / 1000, UTC).date()
            )
        return None
    pulse = _OTX_PULSE.search(url)
    if pulse:
        return _plausible(datetime.fromtimestamp(int(pulse.group(1)[:8], 16), UTC).date())
    for pattern in (_YEAR_MONTH_DAY, _COMPACT_DATE):
        for match in pattern.finditer(url):
            year, month = int(match.group(1)), int(match.group(2))
            day = int(match.group(3)) if match.group(3) else 1
            try:
                found = _plausible(date(year, month, day))
            except ValueError:
                continue
            if found:
                return found
    return None


def _plausible(found: date) -> date | None:
    if EARLIEST_PLAUSIBLE_YEAR <= found.year <= LATEST_PLAUSIBLE_YEAR:
        return found
    return None


def classify_trail(trail: str) -> list[Indicator]:
    """Indicators for one trail line (a URL trail also yields its host)."""
    value = trail.strip().lower()
    if not value or value.startswith("/"):
        return []
    if "://" in value:
        value = value.split("://", 1)[1]
    host_port, slash, path = value.partition("/")
    host = host_port.rsplit(":", 1)[0] if host_port.count(":") == 1 else host_port
    host = host.strip(".")
    host_indicator = _host_indicator(host)
    if host_indicator is None:
        return []
    if slash and path:
        return [Indicator(IndicatorType.URL, f"{host_port}/{path}"), host_indicator]
    return [host_indicator]


def _host_indicator(host: str) -> Indicator | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        kind = IndicatorType.IPV4 if address.version == 4 else IndicatorType.IPV6
        return Indicator(kind, str(address))
    labels = host.split(".")
    if len(labels) < 2 or not all(_HOST_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():
        return None  # a malformed address, not a name
    kind = IndicatorType.ONION if labels[-1] == "onion" else IndicatorType.DOMAIN
    return Indicator(kind, host)


@dataclass(frozen=True, slots=True)
class MaltrailBlock:
    """One ``# Reference`` block: the report plus every reference URL that headed it."""

    report: IntelReport
    references: tuple[str, ...]


def actor_name_from_file(file_name: str) -> str:
    """``apt_lazarus.txt`` → ``lazarus``; ``apt_gamaredon-1.txt`` → ``gamaredon``."""
    stem = Path(file_name).stem.lower()
    stem = re.sub(r"-\d+$", "", stem)
    return stem.removeprefix("apt_")


def parse_aliases(text: str) -> tuple[str, ...]:
    for line in text.splitlines():
        if line.lower().startswith("# aliases:"):
            names = (name.strip() for name in line.split(":", 1)[1].split(","))
            return tuple(dict.fromkeys(name for name in names if name))
    return ()


def parse_maltrail_blocks(
    text: str, file_name: str, resolve_actor: ActorResolver | None = None
) -> list[MaltrailBlock]:
    """Split one trail file into blocks; the actor is the file's name after ``resolve_actor``."""
    file_actor = actor_name_from_file(file_name)
    actor = resolve_actor(file_actor) if resolve_actor else file_actor
    actors = () if file_actor in ("unclassified",) else (actor,)
    blocks: list[MaltrailBlock] = []
    references: list[str] = []
    indicators: dict[Indicator, None] = {}

    def close_block() -> None:
        if references and indicators:
            blocks.append(_block(file_name, len(blocks), references, indicators, actors))

    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line.lower().startswith("# reference:"):
            if indicators:
                close_block()
                references, indicators = [], {}
            references.append(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#") and references:
            for indicator in classify_trail(line.split("#", 1)[0]):
                indicators.setdefault(indicator)
    close_block()
    return blocks


def _block(
    file_name: str,
    index: int,
    references: list[str],
    indicators: dict[Indicator, None],
    actors: tuple[str, ...],
) -> MaltrailBlock:
    dates = [found for url in references if (found := date_from_reference_url(url))]
    digest = hashlib.sha1(
        f"{SOURCE}|{Path(file_name).name}|{'|'.join(references)}".encode()
    ).hexdigest()[:16]
    report = IntelReport(
        report_id=f"{SOURCE}:{digest}",
        source=SOURCE,
        title=f"{Path(file_name).name} block {index + 1}",
        reference=references[0],
        published=min(dates) if dates else None,
        tlp=Tlp.CLEAR,
        actors=actors,
        families=(),
        indicators=tuple(indicators),
    )
    return MaltrailBlock(report, tuple(references))


def parse_maltrail(
    text: str, file_name: str, resolve_actor: ActorResolver | None = None
) -> list[IntelReport]:
    return [block.report for block in parse_maltrail_blocks(text, file_name, resolve_actor)]


def parse_maltrail_file(
    path: Path, resolve_actor: ActorResolver | None = None
) -> list[MaltrailBlock]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise IntelError(f"cannot read maltrail file {path}: {error}") from error
    return parse_maltrail_blocks(text, path.name, resolve_actor)
