"""Warninglists compiled into one sorted hash table, kept on disk and read a block at a time.

Built as Python dicts, the MISP lists take ~300 MB and ~3 s per process (1.7 M entries, most of
them file hashes); every attribution with indicators paid both. Compiled here once per
installation into:

* ``keys``: sorted 64-bit keys, one per (kind, attribute, value) entry: blake2b of the entry
  ("exact" values, "host" suffixes, dynamic-DNS "customer" suffixes, "net" networks as
  ``version/prefix/network address``), and ``names``: the index of the list that holds it;
  where several lists hold an entry the first list wins, as the dict version's ``setdefault``;
* the few substring and regex entries and the order of network prefix lengths, in JSON.

A saved table is not mapped. A process keeps two small things in memory: ``filter``, one bit per
2^40-wide slice of the key space (2 MiB, ~10 % of the bits set), which answers most absent
probes at once, and ``fence``, the first key of each block of ``WARNINGLIST_BLOCK_KEYS`` keys
(27 KB). Any other probe is a binary search in the fence and one ``pread`` of the single block
that can hold it (and two bytes of ``owners`` on a hit). Mapping the arrays instead made the
kernel map whole runs of neighbouring pages on each fault (fault-around works on mapped files
whatever ``madvise`` says): the first query's ~400 probes left all 13 MB of ``keys`` resident
in every query process. Two different entries share a 64-bit key with probability ~1e-7 over
the whole table, a value is wrongly found with probability ~1e-13 per lookup: far below the
lists' own error.

Nothing is unpickled (``allow_pickle=False``); a damaged cache raises ``IntelError`` and the
caller recompiles.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import json
import os
import shutil
import sys
import weakref
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from earmark.errors import IntelError

WARNINGLIST_TABLES_FORMAT: Final = "earmark-warninglists"
# Bump whenever the keys or the matching rules compiled into them change.
# 2: key = hash(kind, value) XOR hash(attribute). 3: fence.npy, the first key of each block.
# 4: filter.npy, one bit per slice of the key space.
WARNINGLIST_TABLES_VERSION: Final = 4
_MANIFEST: Final = "manifest.json"
# Lists per table: list indexes are stored as uint16 (MISP ships ~120 lists).
MAX_WARNINGLISTS: Final = 65_535
# Keys per block read by one lookup: 512 uint64 keys are one 4 KiB page, the unit the disk and
# the page cache read anyway; the fence that finds the block is then 8 bytes per 512 keys
# (27 KB for the 1.7 M keys of the MISP lists).
WARNINGLIST_BLOCK_KEYS: Final = 512
# Blocks kept after a lookup (4 KiB each, 256 KiB in all): the probes of a host's suffixes
# ("com", "co.uk") and of repeated values fall in the same blocks again and again.
WARNINGLIST_CACHED_BLOCKS: Final = 64
# log2 of the bits of the in-memory filter: 2^24 bits (2 MiB) for the 1.7 M keys of the MISP lists
# leave ~10 % of absent keys to a block read. Without it a lookup read ~16 blocks: 41 µs a value
# against 16 µs for the memory-mapped table (test_lookups_are_fast's values); with it 15 µs.
WARNINGLIST_FILTER_BITS_LOG2: Final = 24


@dataclass(frozen=True, slots=True)
class WarninglistData:
    """One list in the shape MISP publishes it (also lets tests build small lists)."""

    name: str
    type: str  # "string", "substring", "hostname", "cidr", "regex"
    entries: tuple[str, ...]
    matching_attributes: tuple[str, ...]


def is_dynamic_dns_list(name: str) -> bool:
    return "dynamic dns" in name.lower()


def _digest(text: str) -> int:
    # surrogatepass: values from samples may hold lone surrogates; they must hash, not raise.
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@lru_cache(maxsize=256)
def _attribute_mask(attribute: str) -> int:
    return _digest(f"attribute\x00{attribute}")


def table_key(kind: str, attribute: str, value: str) -> int:
    """The 64-bit key of one entry (and of the probe that looks it up): the value's hash
    XOR its attribute's, so a value probed under several attributes is hashed once."""
    return _digest(f"{kind}\x00{value}") ^ _attribute_mask(attribute)


# Probes repeat their short suffixes ("com", "co.uk") across values: cached per process.
@lru_cache(maxsize=4096)
def _probe_hash(kind: str, value: str) -> int:
    return _digest(f"{kind}\x00{value}")


def probe_keys(kind: str, value: str, attributes: Sequence[str]) -> list[int]:
    """``table_key(kind, a, value)`` for each attribute, in order."""
    hashed = _probe_hash(kind, value)
    return [hashed ^ _attribute_mask(attribute) for attribute in attributes]


def network_key(version: int, prefix: int, network: int) -> int:
    return table_key("net", str(version), f"{prefix}/{network}")


class KeyColumn(Protocol):
    """Sorted unique 64-bit keys and the list index of each: in memory or in a saved table."""

    def __len__(self) -> int: ...

    def owners_of(self, probes: Sequence[int]) -> list[int | None]:
        """The list index stored with each probe, or None where the key is absent."""
        ...


@dataclass(frozen=True)
class KeyArrays:
    """Keys and owners as arrays (a table just compiled)."""

    keys: npt.NDArray[np.uint64]  # sorted, unique
    owners: npt.NDArray[np.uint16]  # list index per key

    def __len__(self) -> int:
        return len(self.keys)

    def owners_of(self, probes: Sequence[int]) -> list[int | None]:
        if len(self.keys) == 0:
            return [None] * len(probes)
        values = np.array(probes, dtype=np.uint64)
        positions = np.searchsorted(self.keys, values)
        np.minimum(positions, len(self.keys) - 1, out=positions)
        found = self.keys[positions] == values
        owners = self.owners[positions]
        return [
            owner if hit else None
            for hit, owner in zip(found.tolist(), owners.tolist(), strict=True)
        ]


class KeyFile:
    """Keys and owners of a saved table, read one block per probe (see the module docstring).

    Holds two read-only file descriptors, closed when the object is collected.
    """

    def __init__(
        self, path: Path, fence: npt.NDArray[np.uint64], slices: npt.NDArray[np.uint8]
    ) -> None:
        self._keys_fd, self._keys_offset, keys_shape = _open_array(path / "keys.npy", "u8")
        weakref.finalize(self, os.close, self._keys_fd)
        self._owners_fd, self._owners_offset, owners_shape = _open_array(
            path / "owners.npy", "u2"
        )
        weakref.finalize(self, os.close, self._owners_fd)
        if owners_shape != keys_shape or len(keys_shape) != 1:
            raise IntelError(f"{path}: warninglist arrays have the wrong length")
        self._count = keys_shape[0]
        blocks = -(-self._count // WARNINGLIST_BLOCK_KEYS)
        if fence.dtype != np.uint64 or fence.shape != (blocks,):
            raise IntelError(f"{path}: warninglist fence has the wrong shape")
        if slices.dtype != np.uint8 or slices.shape != (1 << WARNINGLIST_FILTER_BITS_LOG2 >> 3,):
            raise IntelError(f"{path}: warninglist filter has the wrong shape")
        # As Python containers: the per-probe loop indexes them without numpy scalars.
        self._fence = array("Q", fence.tolist())
        self._slices = slices.tobytes()
        self._blocks: dict[int, array[int]] = {}  # recently read blocks, oldest first

    def __len__(self) -> int:
        return self._count

    def owners_of(self, probes: Sequence[int]) -> list[int | None]:
        # Plain Python per probe: a find() has a handful of probes, where each numpy call's
        # overhead (~1 µs) would cost more than the work (measured 18 -> 15 µs a value).
        slices, fence, shift = self._slices, self._fence, 64 - WARNINGLIST_FILTER_BITS_LOG2
        found: list[int | None] = []
        for probe in probes:
            found.append(None)
            slice_index = probe >> shift
            if not slices[slice_index >> 3] >> (slice_index & 7) & 1:
                continue  # no key in this slice of the key space
            # Block b holds keys in [fence[b], fence[b + 1]); below fence[0] nothing is stored.
            block = bisect.bisect_right(fence, probe) - 1
            if block < 0:
                continue
            keys = self._read_block(block)
            position = bisect.bisect_left(keys, probe)
            if position < len(keys) and keys[position] == probe:
                found[-1] = self._read_owner(block * WARNINGLIST_BLOCK_KEYS + position)
        return found

    def _read_block(self, block: int) -> array[int]:
        keys = self._blocks.get(block)
        if keys is not None:
            return keys
        start = block * WARNINGLIST_BLOCK_KEYS
        count = min(WARNINGLIST_BLOCK_KEYS, self._count - start)
        raw = os.pread(self._keys_fd, 8 * count, self._keys_offset + 8 * start)
        if len(raw) != 8 * count:
            raise IntelError("the warninglist keys file is shorter than its header says")
        keys = array("Q", raw)
        if sys.byteorder != "little":
            keys.byteswap()  # the file is little-endian (checked by _open_array)
        if len(self._blocks) >= WARNINGLIST_CACHED_BLOCKS:
            del self._blocks[next(iter(self._blocks))]  # the oldest read
        self._blocks[block] = keys
        return keys

    def _read_owner(self, index: int) -> int:
        raw = os.pread(self._owners_fd, 2, self._owners_offset + 2 * index)
        return int.from_bytes(raw, "little")

    def arrays(self) -> KeyArrays:
        """Every key and owner read into memory (to save the table elsewhere)."""
        keys = os.pread(self._keys_fd, 8 * self._count, self._keys_offset)
        owners = os.pread(self._owners_fd, 2 * self._count, self._owners_offset)
        return KeyArrays(
            keys=np.frombuffer(keys, dtype="<u8").astype(np.uint64),
            owners=np.frombuffer(owners, dtype="<u2").astype(np.uint16),
        )


def _open_array(path: Path, kind: str) -> tuple[int, int, tuple[int, ...]]:
    """A read-only descriptor of the ``.npy`` file at ``path``, the offset of its data and its
    shape; the header must describe a little-endian C-order array of ``kind``."""
    with path.open("rb") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        offset = file.tell()
    if fortran or dtype != np.dtype(f"<{kind}"):
        raise IntelError(f"{path}: warninglist array has the wrong type")
    size = path.stat().st_size
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        raise IntelError(f"{path}: {size} bytes where the header says {expected}")
    return os.open(path, os.O_RDONLY), offset, tuple(shape)


@dataclass(frozen=True)
class WarninglistTables:
    """The compiled lists."""

    names: tuple[str, ...]
    keys: KeyColumn
    # attribute -> (fragment, list index), in list order
    substrings: dict[str, tuple[tuple[str, int], ...]]
    # attribute -> (PCRE expression as published, list index), in list order
    regexes: dict[str, tuple[tuple[str, int], ...]]
    # IP version -> prefix lengths in the order their first network was added
    prefixes: dict[int, tuple[int, ...]]

    def find(self, keys: Sequence[int]) -> list[str | None]:
        """The list name holding each key, or None; one pass over all of them."""
        if not keys or len(self.keys) == 0:
            return [None] * len(keys)
        names: list[str | None] = []
        for owner in self.keys.owners_of(keys):
            if owner is not None and owner >= len(self.names):
                raise IntelError("the warninglist table names an unknown list (damaged cache)")
            names.append(None if owner is None else self.names[owner])
        return names


class _TableBuilder:
    """Keys in ``array`` buffers (8 + 2 bytes per entry), so compiling peaks near the size of
    the result rather than at Python dicts of 1.7 M strings."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.keys = array("Q")
        self.owners = array("H")
        self.substrings: dict[str, list[tuple[str, int]]] = {}
        self.regexes: dict[str, list[tuple[str, int]]] = {}
        self.prefixes: dict[int, list[int]] = {4: [], 6: []}

    def _add_keys(self, keys: Iterable[int], owner: int) -> None:
        before = len(self.keys)
        self.keys.extend(keys)
        self.owners.extend([owner] * (len(self.keys) - before))

    def add(self, warninglist: WarninglistData) -> None:
        if len(self.names) >= MAX_WARNINGLISTS:
            raise IntelError(f"more than {MAX_WARNINGLISTS} warninglists")
        owner = len(self.names)
        self.names.append(warninglist.name)
        kind, entries = warninglist.type, warninglist.entries
        if kind == "cidr":
            self._add_keys(self._network_keys(entries), owner)
        elif kind == "hostname" and is_dynamic_dns_list(warninglist.name):
            self._add_keys(
                (table_key("customer", "", e.strip().lower().strip(".")) for e in entries), owner
            )
        elif kind == "hostname":
            for attribute in warninglist.matching_attributes:
                self._add_keys(
                    (table_key("host", attribute, e.strip().lower().strip(".")) for e in entries),
                    owner,
                )
        elif kind == "string":
            for attribute in warninglist.matching_attributes:
                self._add_keys(
                    (table_key("exact", attribute, e.strip().lower()) for e in entries), owner
                )
        elif kind == "substring":
            for attribute in warninglist.matching_attributes:
                self.substrings.setdefault(attribute, []).extend(
                    (entry.lower(), owner) for entry in entries if entry
                )
        elif kind == "regex":
            for attribute in warninglist.matching_attributes:
                self.regexes.setdefault(attribute, []).extend((e, owner) for e in entries)

    def _network_keys(self, entries: Iterable[str]) -> Iterable[int]:
        for entry in entries:
            try:
                network = ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                continue  # a few lists mix in host names; cidr lists match addresses only
            order = self.prefixes[network.version]
            if network.prefixlen not in order:
                order.append(network.prefixlen)
            yield network_key(
                network.version, network.prefixlen, int(network.network_address)
            )

    def finish(self) -> WarninglistTables:
        keys = np.frombuffer(self.keys, dtype=np.uint64) if self.keys else np.zeros(0, np.uint64)
        owners = (
            np.frombuffer(self.owners, dtype=np.uint16) if self.owners else np.zeros(0, np.uint16)
        )
        # Stable sort, first of each run of equal keys: the first list that added an entry
        # keeps it, as ``dict.setdefault`` in list order did.
        order = np.argsort(keys, kind="stable")
        keys, owners = keys[order], owners[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        return WarninglistTables(
            names=tuple(self.names),
            keys=KeyArrays(keys=keys[first], owners=owners[first]),
            substrings={a: tuple(v) for a, v in self.substrings.items()},
            regexes={a: tuple(v) for a, v in self.regexes.items()},
            prefixes={v: tuple(p) for v, p in self.prefixes.items()},
        )


def compile_warninglists(lists: Iterable[WarninglistData]) -> WarninglistTables:
    """Compile ``lists`` in order (consumed one list at a time)."""
    builder = _TableBuilder()
    for warninglist in lists:
        builder.add(warninglist)
    return builder.finish()


def save_tables(tables: WarninglistTables, path: Path, source: str) -> None:
    """Write ``tables`` to the directory ``path`` (staged and renamed: readers never see half
    a table). ``source`` identifies the lists compiled, checked by ``load_tables``."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    arrays = tables.keys if isinstance(tables.keys, KeyArrays) else _read_all(tables.keys)
    np.save(staging / "keys.npy", arrays.keys.astype("<u8"), allow_pickle=False)
    np.save(staging / "owners.npy", arrays.owners.astype("<u2"), allow_pickle=False)
    fence = arrays.keys[::WARNINGLIST_BLOCK_KEYS].astype("<u8")
    np.save(staging / "fence.npy", fence, allow_pickle=False)
    np.save(staging / "filter.npy", key_filter(arrays.keys), allow_pickle=False)
    manifest = {
        "format": WARNINGLIST_TABLES_FORMAT,
        "version": WARNINGLIST_TABLES_VERSION,
        "source": source,
        "entries": len(tables.keys),
        "names": list(tables.names),
        "substrings": {a: list(map(list, v)) for a, v in tables.substrings.items()},
        "regexes": {a: list(map(list, v)) for a, v in tables.regexes.items()},
        "prefixes": {str(v): list(p) for v, p in tables.prefixes.items()},
    }
    (staging / _MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    try:
        staging.rename(path)
    except OSError:
        # Another process saved the same tables first: keep theirs.
        shutil.rmtree(staging, ignore_errors=True)


def key_filter(keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """One bit per slice of the key space (the top WARNINGLIST_FILTER_BITS_LOG2 bits of a key),
    set where a key falls, packed little-endian within each byte."""
    present = np.zeros(1 << WARNINGLIST_FILTER_BITS_LOG2, dtype=bool)
    present[keys >> np.uint64(64 - WARNINGLIST_FILTER_BITS_LOG2)] = True
    return np.packbits(present, bitorder="little")


def _read_all(column: KeyColumn) -> KeyArrays:
    if isinstance(column, KeyFile):
        return column.arrays()
    raise TypeError(f"unknown key column {type(column).__name__}")  # a bug, not input


def load_tables(path: Path, source: str) -> WarninglistTables | None:
    """The tables saved at ``path`` for ``source``, read block by block (``KeyFile``); None
    when absent or compiled from other lists. Raises ``IntelError`` when the directory is
    damaged."""
    manifest_path = path / _MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if (
            manifest.get("format") != WARNINGLIST_TABLES_FORMAT
            or manifest.get("version") != WARNINGLIST_TABLES_VERSION
            or manifest.get("source") != source
        ):
            return None
        fence = np.load(path / "fence.npy", allow_pickle=False)
        slices = np.load(path / "filter.npy", allow_pickle=False)
        keys = KeyFile(path, fence, slices)
        names = tuple(str(name) for name in manifest["names"])
        tables = WarninglistTables(
            names=names,
            keys=keys,
            substrings=_pairs(manifest["substrings"], len(names)),
            regexes=_pairs(manifest["regexes"], len(names)),
            prefixes={int(v): tuple(int(p) for p in ps) for v, ps in manifest["prefixes"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise IntelError(f"cannot read the warninglist cache at {path}: {error}") from error
    _check_tables(tables, path, manifest.get("entries"))
    return tables


_Pairs = dict[str, tuple[tuple[str, int], ...]]


def _pairs(raw: dict[str, list[list[object]]], names: int) -> _Pairs:
    result: _Pairs = {}
    for attribute, pairs in raw.items():
        checked = []
        for text, owner in pairs:
            if not isinstance(text, str) or not isinstance(owner, int) or not 0 <= owner < names:
                raise ValueError(f"bad entry for {attribute}")
            checked.append((text, owner))
        result[str(attribute)] = tuple(checked)
    return result


def _check_tables(tables: WarninglistTables, path: Path, entries: object) -> None:
    """Shape checks only (``KeyFile`` checked types and lengths against the headers): scanning
    the arrays (sortedness, owner range) would read all of them, which reading by block
    avoids. An owner out of range is caught at lookup (``find``); the tables are written by
    ``save_tables`` alone, staged and renamed."""
    if entries != len(tables.keys):
        raise IntelError(f"{path}: warninglist arrays have the wrong length")
