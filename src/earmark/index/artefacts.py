"""Artefacts of a sample (rare strings, export names, imphash, PDB path, Rich header, signer,
version info) and how many groups of the knowledge base hold each one.

An artefact is a ``(kind, value)`` pair keyed by a 64-bit BLAKE2b hash. ``ArtefactStats`` holds,
per key seen in the KB, the number of distinct owners (actors, else families, else the sample
itself, as for code rarity in ``index.rarity``) and of goodware samples, plus up to
``MAX_LISTED_OWNERS`` owners with one example sample each; the weight is code rarity's
``rarity_weight``, so a string every family has weighs 0 and a string of one family weighs 1.
It also records which libraries KB samples import, and which names they import from each, for
shared-dependency detection (``earmark.correlate.artefacts``).

The statistics are built from stored features once per store revision and cached beside the KB
as ``<db>.artefacts/`` (``.npy`` arrays, no pickles, plus a JSON manifest); see
docs/attribution.md, "Artefact pillar".
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from earmark.index.rarity import rarity_weight
from earmark.model.kb import SampleRecord
from earmark.model.sample import SampleFeatures

ArtefactKind = Literal[
    "string", "export", "imphash", "pdb", "rich-header", "signer", "version-info"
]

# String filter, measured on the PE corpus (every project file <= 1 MB; "own" = strings of one
# project present in both its oldest and newest release and in no other project; "cross" =
# strings held by 2-3 projects, mostly chance byte runs such as "n:2C[" or instruction bytes):
#   raw `strings -n 5`                                   own 4,045  cross 1,829
#   length >= 6, >= 80 % word characters, 3 letters in a row  own 3,264  cross   705
#   ... and not inside an executable section, not a linker section-group name
#                                                        own 3,175  cross   482
# Length 8 instead of 6 lost another 10 % of own strings for 14 % fewer cross ones. The first
# filter was chosen before any attribution result was seen; the last two were added after
# attribution runs showed their false matches (docs/attribution.md, "Artefact pillar").
MIN_ARTEFACT_STRING_LENGTH: Final = 6
MIN_STRING_WORD_SHARE: Final = 0.8
_WORD: Final = re.compile(r"[A-Za-z]{3}")
_WORD_CHARACTERS: Final = frozenset(" _.-:%/\\,")
# A character neither alphanumeric (``str.isalnum``) nor in _WORD_CHARACTERS, for one regex scan
# per string: ``\w`` is exactly ``isalnum`` plus "_" (tests/test_artefacts.py: every code point).
_NOT_WORD_CHARACTER: Final = re.compile(r"[^\w .\-:%/\\,]")
# Names of COFF grouped sections (".text$mn", ".CRT$XCA", ".data$r") that MSVC's linker records
# in the POGO debug data: toolchain metadata (the Rich header speaks for it), not author text.
_SECTION_GROUP: Final = re.compile(r"^\.[A-Za-z0-9_.]*\$[A-Za-z0-9_$]*$")
# Strings taken per sample (first by file offset). Corpus files (<= 1 MB) keep at most 1,568
# after the filter (median 211); a padded or junk-filled file must not grow the KB statistics
# without bound.
MAX_ARTEFACT_STRINGS: Final = 20_000
# Characters of one artefact value used as its key; longer runs are blobs, their start is enough.
MAX_ARTEFACT_VALUE_LENGTH: Final = 256
# Owners listed per key. A key held by more groups weighs at most idf/9 < 0.11
# (``rarity_weight``): evidence of nothing, so no evidence item names them.
MAX_LISTED_OWNERS: Final = 8
# Samples listed per key (every sample of the listed owners, up to this many): the share of a KB
# sample's rare strings found in a query needs them. A family with more copies of one string
# than this is represented by its first 64 samples (by owner, then sample id).
MAX_LISTED_SAMPLES: Final = 64
# Rarity weight from which an artefact is evidence (and counts as one of a sample's rare
# strings): in a KB of 13 groups a string held by 4 of them weighs idf/4 = 0.11, by 3 weighs
# 0.19 (``rarity_weight``). 0.15 keeps what at most three groups share; runtime and Python
# C-API strings, held by most, weigh ~0 and stay out.
RARE_ARTEFACT_WEIGHT: Final = 0.15
# Version-info fields that change with every release carry no identity of the author.
_VERSION_NUMBER_KEYS: Final = frozenset({"FileVersion", "ProductVersion", "PrivateBuild"})

# Bump whenever sample_artefacts or the key hash changes: old caches are then rebuilt
# (``index.artefact_cache``).
ARTEFACT_STATS_FORMAT_VERSION: Final = 3

UInt64Array = npt.NDArray[np.uint64]
_Number = TypeVar("_Number", bound=np.generic)


@dataclass(frozen=True, slots=True)
class SampleArtefact:
    kind: ArtefactKind
    value: str  # as found (shown escaped); the key uses the normalised form
    key: int  # artefact_key(kind, normalised value)
    offset: int | None = None  # file offset (strings)
    address: int | None = None  # virtual address (exports)


def artefact_key(kind: str, value: str) -> int:
    """64-bit key of one artefact: BLAKE2b, so keys do not collide in a KB of millions."""
    digest = hashlib.blake2b(f"{kind}\0{value}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def is_distinctive_string(text: str) -> bool:
    """The string filter above: long enough, word-like, not a byte run that happens to print."""
    if len(text) < MIN_ARTEFACT_STRING_LENGTH:
        return False
    good = len(text) - len(_NOT_WORD_CHARACTER.findall(text))
    return good >= MIN_STRING_WORD_SHARE * len(text) and _WORD.search(text) is not None


def _table_names(features: SampleFeatures) -> frozenset[str]:
    """Import/export/section names (lower case): their strings are the tables, counted by
    imphash/exports. Library names are compared without case: the import directory of a PE
    may say "msvcp140.dll" where its string table says "MSVCP140.dll"."""
    names = {item.name for item in features.imports} | {item.library for item in features.imports}
    names |= {item.name for item in features.exports} | {s.name for s in features.sections}
    return frozenset(name.lower() for name in names)


def _code_ranges(features: SampleFeatures) -> list[tuple[int, int]]:
    """File ranges of executable sections: printable runs there are instruction bytes
    ("AWAVAUATI" is push r15; push r14; ...), equal in any two x86-64 programs by chance."""
    return [
        (section.raw_offset, section.raw_offset + section.raw_size)
        for section in features.sections
        if "execute" in section.flags or "code" in section.flags
    ]


def _inside(offset: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= offset < end for start, end in ranges)


def _make(kind: ArtefactKind, value: str, **where: int | None) -> SampleArtefact | None:
    normalised = value.strip()[:MAX_ARTEFACT_VALUE_LENGTH]
    if not normalised:
        return None
    if kind in ("pdb", "imphash", "signer"):
        normalised = normalised.lower().replace("\\", "/")
    return SampleArtefact(kind, value, artefact_key(kind, normalised), **where)


def _pe_artefacts(features: SampleFeatures) -> list[SampleArtefact | None]:
    pe = features.pe
    if pe is None:
        return []
    found: list[SampleArtefact | None] = []
    if pe.imphash:
        found.append(_make("imphash", pe.imphash))
    if pe.pdb_path:
        path = pe.pdb_path.replace("\\", "/")
        found.append(_make("pdb", path))
        # The file name survives a moved build folder; the folder survives a renamed target.
        found.append(_make("pdb", path.rsplit("/", 1)[-1]))
        if "/" in path:
            found.append(_make("pdb", path.rsplit("/", 1)[0] + "/"))
    if pe.rich_header is not None and pe.rich_header.entries:
        # The set of (product, build) pairs is the build environment; counts follow the code.
        tools = sorted({(e.product_id, e.build) for e in pe.rich_header.entries})
        found.append(_make("rich-header", ";".join(f"{p}.{b}" for p, b in tools)))
    for signer in pe.signers:
        found.append(_make("signer", signer.sha1))
    for key, value in pe.version_info:
        if key not in _VERSION_NUMBER_KEYS and len(value.strip()) >= 3:
            found.append(_make("version-info", f"{key}={value}"))
    return found


# Key of a string that the text filters drop (artefact keys are unsigned, never -1).
_DROPPED: Final = -1


def _string_key(value: str) -> int:
    """The key of a string artefact; _DROPPED when its text alone rules it out."""
    text = value.strip()
    if not is_distinctive_string(text) or _SECTION_GROUP.match(text):
        return _DROPPED
    return artefact_key("string", text[:MAX_ARTEFACT_VALUE_LENGTH])


def sample_artefacts(
    features: SampleFeatures, known: dict[str, int] | None = None
) -> tuple[SampleArtefact, ...]:
    """Every artefact of one sample, first occurrence of each key only. ``known`` keeps each
    string's ``_string_key`` across a build's samples (PE bench KB: 108k strings, 22k distinct)."""
    found: list[SampleArtefact | None] = [
        _make("export", export.name, address=export.address)
        for export in features.exports
        if export.name and not export.name.startswith("#")
    ]
    found += _pe_artefacts(features)
    tables, code = _table_names(features), _code_ranges(features)
    strings, memo = 0, ({} if known is None else known)
    for string in features.strings:
        value = string.value
        # Where it lies first: half the strings of a PE are in its code sections (PE bench (a)
        # KB: 56k of 109k), and their key is never needed.
        if _inside(string.offset, code) or value.strip().lower() in tables:
            continue
        key = memo.get(value)
        if key is None:
            key = memo[value] = _string_key(value)
        if key == _DROPPED:
            continue
        found.append(SampleArtefact("string", value, key, offset=string.offset))
        strings += 1
        if strings >= MAX_ARTEFACT_STRINGS:
            break
    unique: dict[int, SampleArtefact] = {}
    for artefact in found:
        if artefact is not None and artefact.key not in unique:
            unique[artefact.key] = artefact
    return tuple(unique.values())


def imported_libraries(features: SampleFeatures) -> dict[str, set[str]]:
    """Library (lower case) -> names imported from it (ordinals left out)."""
    libraries: dict[str, set[str]] = defaultdict(set)
    for item in features.imports:
        if item.library and item.library != "unknown":
            names = libraries[item.library.lower()]
            if item.name and not item.name.startswith("#"):
                names.add(item.name)
    return libraries


@dataclass(frozen=True, slots=True)
class ArtefactRows:
    """What one sample adds to the artefact statistics (``ArtefactStatsBuilder.add_rows``),
    computed from its decoded features alone."""

    keys: tuple[int, ...]  # its distinct artefact keys
    string_keys: tuple[int, ...]  # those of string artefacts, in order
    libraries: tuple[tuple[str, frozenset[str]], ...]  # ``imported_libraries``, by name


def artefact_rows(features: SampleFeatures, known: dict[str, int] | None = None) -> ArtefactRows:
    """The ``ArtefactRows`` of one sample (``known``: see ``sample_artefacts``)."""
    artefacts = sample_artefacts(features, known)  # unique keys
    return ArtefactRows(
        keys=tuple(artefact.key for artefact in artefacts),
        string_keys=tuple(artefact.key for artefact in artefacts if artefact.kind == "string"),
        libraries=tuple(
            (library, frozenset(names))
            for library, names in sorted(imported_libraries(features).items())
        ),
    )


@dataclass(frozen=True, slots=True)
class LibraryUsage:
    """Who in the KB imports one library, and what it imports from it."""

    importers: int  # distinct owners plus goodware samples importing it
    examples: tuple[str, ...]  # up to MAX_LISTED_OWNERS owner names
    names: frozenset[str]  # every name imported from it by any KB sample


@dataclass(frozen=True, slots=True)
class ArtefactMatch:
    """One query artefact found in the KB."""

    weight: float
    owner_count: int
    goodware_count: int
    owners: tuple[str, ...]  # distinct listed owner names (empty past MAX_LISTED_OWNERS)
    samples: tuple[int, ...]  # KB sample ids holding it (listed owners only)


@dataclass(frozen=True)
class ArtefactStats:
    """Document frequency of every artefact in the KB, keyed by ``artefact_key``."""

    revision: int
    keys: UInt64Array  # sorted
    owner_count: npt.NDArray[np.uint32]
    goodware_count: npt.NDArray[np.uint32]
    weight: npt.NDArray[np.float32]
    listed_offsets: npt.NDArray[np.int64]  # (keys + 1,) into listed_owner / listed_sample
    listed_owner: npt.NDArray[np.int32]
    listed_sample: npt.NDArray[np.int64]
    # Per KB sample (sorted ids): how many of its strings are rare (RARE_ARTEFACT_WEIGHT).
    sample_ids: npt.NDArray[np.int64]
    rare_strings: npt.NDArray[np.int64]
    owner_names: tuple[str, ...]
    total_owners: int
    libraries: Mapping[str, LibraryUsage]

    def lookup(self, keys: Iterable[int]) -> dict[int, ArtefactMatch]:
        """The KB statistics of each key present (vectorised search)."""
        wanted = np.fromiter(keys, dtype=np.uint64)
        if len(wanted) == 0 or len(self.keys) == 0:
            return {}
        places = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        found: dict[int, ArtefactMatch] = {}
        for key, place in zip(wanted.tolist(), places.tolist(), strict=True):
            if int(self.keys[place]) != key:
                continue
            start, end = int(self.listed_offsets[place]), int(self.listed_offsets[place + 1])
            owners = dict.fromkeys(self.listed_owner[start:end].tolist())
            found[key] = ArtefactMatch(
                weight=float(self.weight[place]),
                owner_count=int(self.owner_count[place]),
                goodware_count=int(self.goodware_count[place]),
                owners=tuple(self.owner_names[o] for o in owners),
                samples=tuple(self.listed_sample[start:end].tolist()),
            )
        return found

    def rare_string_count(self, sample_id: int) -> int:
        """How many of a KB sample's strings are rare (0 for an unknown sample)."""
        place = int(np.searchsorted(self.sample_ids, sample_id))
        if place < len(self.sample_ids) and int(self.sample_ids[place]) == sample_id:
            return int(self.rare_strings[place])
        return 0

    @property
    def nbytes(self) -> int:
        arrays = (
            self.keys,
            self.owner_count,
            self.goodware_count,
            self.weight,
            self.listed_offsets,
            self.listed_owner,
            self.listed_sample,
            self.sample_ids,
            self.rare_strings,
        )
        return sum(int(array.nbytes) for array in arrays)


def build_artefact_stats(
    samples: Iterable[tuple[SampleRecord, SampleFeatures]], revision: int
) -> ArtefactStats:
    """KB statistics from every stored sample (one decoded sample alive at a time)."""
    builder = ArtefactStatsBuilder()
    for record, features in samples:
        builder.add(record, features)
        del features  # not kept alive while the next sample is decoded
    return builder.finish(revision)


class ArtefactStatsBuilder:
    """Counts added sample by sample, so one decoding pass over the stored samples can feed
    this and the feature candidate stage alike (``KnowledgeBase.prepare``).

    What each sample holds is kept as flat integer arrays (``array.array``), one entry per
    (key, owner, sample) and per key, and counted by sorting them at the end: the dict of
    dicts of lists this replaced made ~60 k small objects over the PE bench (a+c) KB, which
    were live through the whole pass amid the transient objects of the samples it decodes.
    """

    def __init__(self) -> None:
        self.owner_codes: dict[str, int] = {}
        self.library_importers: dict[str, set[str]] = defaultdict(set)
        self.library_names: dict[str, set[str]] = defaultdict(set)
        self.string_keys: dict[str, int] = {}  # sample_artefacts's memo, for this build
        self._seen = array("Q")  # every key of every sample
        self._goodware = array("Q")  # the keys of each goodware sample
        self._owned = array("Q")  # (key, owner code, sample id) of non-goodware samples
        self._owned_codes = array("q")
        self._owned_samples = array("q")
        self._strings = array("Q")  # each sample's string keys, end to end
        self._string_ranges: dict[int, tuple[int, int]] = {}  # sample id -> its range

    def add(self, record: SampleRecord, features: SampleFeatures) -> None:
        self.add_rows(record, artefact_rows(features, self.string_keys))

    def add_rows(self, record: SampleRecord, rows: ArtefactRows) -> None:
        """Add one sample's ``artefact_rows`` (made here by ``add``, or by a build's
        decoding processes, ``kb_build``)."""
        keys, strings = rows.keys, rows.string_keys
        start = len(self._strings)
        self._string_ranges[record.sample_id] = (start, start + len(strings))
        self._strings.extend(strings)
        self._seen.extend(keys)
        if record.goodware:
            self._goodware.extend(keys)
            importer = [f"goodware:{record.sample_id}"]
        else:
            owner_codes = self.owner_codes
            for owner in record.owner_keys:
                code = owner_codes.setdefault(owner, len(owner_codes))
                self._owned.extend(keys)
                self._owned_codes.extend([code] * len(keys))
                self._owned_samples.extend([record.sample_id] * len(keys))
            importer = record.owner_keys
        for library, names in rows.libraries:
            self.library_importers[library].update(importer)
            self.library_names[library] |= names

    def stop_adding(self) -> None:
        """No sample follows: the string memo (a string and a key per distinct string, ~3 MB
        on the PE bench (a+c) KB) is let go before ``finish`` rather than at it."""
        self.string_keys = {}

    def finish(self, revision: int) -> ArtefactStats:
        self.stop_adding()
        keys = np.unique(_column(self._seen, np.uint64))
        owned = _column(self._owned, np.uint64)
        codes = _column(self._owned_codes, np.int64)
        samples = _column(self._owned_samples, np.int64)
        order = np.lexsort((samples, codes, owned))  # by key, then owner, then sample
        owned, codes, samples = owned[order], codes[order], samples[order]
        place = np.searchsorted(keys, owned)
        first_of_owner = np.ones(len(owned), dtype=np.bool_)
        first_of_owner[1:] = (owned[1:] != owned[:-1]) | (codes[1:] != codes[:-1])
        owner_count = np.bincount(place[first_of_owner], minlength=len(keys)).astype(np.uint32)
        goodware = np.searchsorted(keys, _column(self._goodware, np.uint64))
        goodware_count = np.bincount(goodware, minlength=len(keys)).astype(np.uint32)
        # Each listed key's first MAX_LISTED_SAMPLES (owner, sample) pairs, in that order.
        key_start = np.searchsorted(place, np.arange(len(keys)))
        rank = np.arange(len(place)) - key_start[place]
        listed = (owner_count[place] <= MAX_LISTED_OWNERS) & (rank < MAX_LISTED_SAMPLES)
        listed_per_key = np.bincount(place[listed], minlength=len(keys))
        weight = rarity_weight(owner_count, goodware_count, len(self.owner_codes))
        rare = weight.astype(np.float64) >= RARE_ARTEFACT_WEIGHT
        sample_ids = sorted(self._string_ranges)
        rare_string = rare[np.searchsorted(keys, _column(self._strings, np.uint64))]
        rare_before = np.r_[0, np.cumsum(rare_string, dtype=np.int64)]
        ranges = np.array([self._string_ranges[s] for s in sample_ids], np.int64).reshape(-1, 2)
        libraries = {
            library: LibraryUsage(
                importers=len(importers),
                examples=tuple(
                    sorted(
                        i.split(":", 1)[1] for i in importers if not i.startswith("goodware:")
                    )[:MAX_LISTED_OWNERS]
                ),
                names=frozenset(self.library_names[library]),
            )
            for library, importers in sorted(self.library_importers.items())
        }
        return ArtefactStats(
            revision=revision,
            keys=keys,
            owner_count=owner_count,
            goodware_count=goodware_count,
            weight=weight,
            listed_offsets=np.r_[0, np.cumsum(listed_per_key)].astype(np.int64),
            listed_owner=codes[listed].astype(np.int32),
            listed_sample=samples[listed],
            sample_ids=np.array(sample_ids, dtype=np.int64),
            rare_strings=rare_before[ranges[:, 1]] - rare_before[ranges[:, 0]],
            owner_names=tuple(name.split(":", 1)[1] for name in self.owner_codes),
            total_owners=len(self.owner_codes),
            libraries=libraries,
        )


def _column(values: array[int], dtype: type[_Number]) -> npt.NDArray[_Number]:
    """An ``array.array`` of 8-byte items as a numpy column (no copy)."""
    if not values:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(values, dtype=dtype)
