"""What one stored sample adds to a knowledge-base-wide build (``SampleRows``), and the two
places a build finds them without decoding the sample's frozen features again:

- ``RowSpool``: the rows an ingest's workers made for the samples it has just written, held
  in an unnamed temporary file until the next build of the same ``KnowledgeBase`` (an
  in-memory KB, which has no cache directory).
- ``RowCache``: the same rows kept beside a SQLite KB as ``<db>.rows/`` (a server KB's under
  ``$EARMARK_CACHE_DIR/rows/``: ``knowledge_base.row_cache_path``), one file per sample, so
  that every later build reads them instead of decoding: a build reads every stored
  sample, and decoding was most of its cost once a KB held more than the samples just added
  (PE bench: adding 21 files to a 103-file KB decoded the 103 again, ~1.0 of ~1.7 CPU s).

A sample's stored features never change once written, so its rows stay valid as long as they
were made from the same stored bytes, with the same ``min_instructions`` and by the same row
format: a cache file records all three and is used only when they match; anything else in
the directory (a damaged, foreign or outdated file) is ignored and the sample is decoded.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from earmark.errors import StoreError
from earmark.index.artefacts import ArtefactRows, artefact_rows
from earmark.index.compact_rows import INT_REFERENCES, TEXT_REFERENCES, ColumnBlock
from earmark.index.feature_candidates import StageRows, TextKeys, stage_rows
from earmark.model.sample import MINHASH_PERMUTATIONS, SampleFeatures

__all__ = [
    "ABANDONED_WRITE_SECONDS",
    "MAX_ROW_FILE_BYTES",
    "ROW_FORMAT_VERSION",
    "BuildRows",
    "Origin",
    "RowCache",
    "RowSpool",
    "SampleRows",
    "WrittenRows",
    "origin_of",
    "rows_of",
    "sample_rows",
    "write_rows_file",
]

# Version of the cache files' rows: raised whenever what ``rows_of`` makes from the same
# features changes (a feature key, an artefact, a column), so older files are not used.
ROW_FORMAT_VERSION: Final = 1
# Largest cache file read. The rows of a sample take ~0.7 KB per function (PE bench KB), so a
# sample at the analysis limit of 50,000 functions needs ~35 MB; a larger file is not ours.
MAX_ROW_FILE_BYTES: Final = 128 * 1024 * 1024

# Age past which a temporary file in the cache is a write that a killed process never finished
# (a write takes milliseconds; a build an hour long would be past the stage's sample limit).
ABANDONED_WRITE_SECONDS: Final = 3600

_MAGIC: Final = b"EARMARKR"
_TEMPORARY_PREFIX: Final = ".rows-"
# magic, row format, min_instructions, stored blob length, stored blob CRC-32, body CRC-32
_HEADER: Final = struct.Struct("<8sHIQII")


@dataclass(frozen=True, slots=True)
class SampleRows:
    """What one stored sample adds to a KB-wide build: its feature stage rows and its
    artefact rows, made from its decoded features alone (``rows_of``)."""

    stage: StageRows
    artefacts: ArtefactRows
    functions: int  # functions decoded (the pass's memory bookkeeping)


def rows_of(
    features: SampleFeatures,
    min_instructions: int,
    text_keys: TextKeys,
    string_keys: dict[str, int] | None = None,
) -> SampleRows:
    """The ``SampleRows`` of ``features`` (``text_keys`` and ``string_keys``: memos that may
    last over many samples of one build)."""
    return SampleRows(
        stage=stage_rows(features.functions, min_instructions, text_keys),
        artefacts=artefact_rows(features, string_keys),
        functions=len(features.functions),
    )


def sample_rows(features: SampleFeatures, min_instructions: int) -> SampleRows:
    """The ``SampleRows`` of features at hand (an ingest worker's, just analysed), as the
    build would make them from the stored copy: the frozen format reads back equal (``==``),
    and the rows never read the instruction tokens the build leaves out."""
    return rows_of(features, min_instructions, TextKeys())


Origin = tuple[int, int]  # length and CRC-32 of a sample's stored features bytes


def origin_of(features_blob: bytes) -> Origin:
    """What identifies the stored bytes rows were made from: their length and CRC-32 (~0.3 ms
    for a 300 KB blob; whatever the store's codec writes)."""
    return len(features_blob), zlib.crc32(features_blob)


class RowSpool:
    """The build rows of the samples an ingest has just written, made by its workers while
    they held the features (``ingest_groups(..., rows=spool)``), so that the next build in
    this process reads them instead of decoding those samples again (PE bench (a) KB:
    decoding was ~0.5 of ~1.9 CPU s of ``prepare``, and the rows cost the workers ~0.4 s).

    The rows are pickled into an unnamed temporary file that only this process wrote, with
    their offsets held here. ``stored_rows`` uses them only for the ``min_instructions`` they
    were made with, and ``KnowledgeBase.prepare`` empties the spool after each build.

    At most ``max_samples`` are kept (~0.7 KB per function on the PE bench KB): past the
    feature stage's sample limit no build would read them, and an ingest of a large
    collection should not fill the temporary directory."""

    def __init__(self, min_instructions: int, max_samples: int) -> None:
        self.min_instructions = min_instructions
        self.max_samples = max_samples
        self._file: IO[bytes] | None = None
        self._where: dict[str, tuple[int, int]] = {}  # sha256 -> offset, length

    def has_room(self) -> bool:
        return len(self._where) < self.max_samples

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self._where

    def add(self, sha256: str, rows: SampleRows, features_blob: bytes) -> None:
        """Keep the rows of ``sha256`` (dropped when the spool is full: decoded instead).
        ``features_blob`` (the stored bytes) is not needed: the spool lives only as long as
        the store it was filled from."""
        del features_blob
        if not self.has_room():
            return
        if self._file is None:
            # Held open across calls (closed by ``clear``): no ``with`` block spans its life.
            self._file = tempfile.TemporaryFile(prefix="earmark-rows-")  # noqa: SIM115
        data = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(data)
        self._where[sha256] = (offset, len(data))

    def take(self, sha256: str) -> SampleRows:
        """The rows of ``sha256`` (KeyError when not spooled)."""
        offset, length = self._where[sha256]
        assert self._file is not None  # set by the add that recorded the offset
        self._file.seek(offset)
        rows = pickle.loads(self._file.read(length))  # written by this process, above
        if not isinstance(rows, SampleRows):
            raise StoreError("build row spool damaged")
        return rows

    def clear(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._where = {}


class RowCache:
    """``SampleRows`` kept in ``directory`` (``row_cache_path``), one file per sample, for every
    later build of that KB: written by ingest as the samples are stored (from the rows its
    workers made) and by a build for each sample it had to decode.

    Files are written whole under a temporary name and renamed, so a reader sees a whole file
    or none; a file this object did not write in this process is used only when its origin
    (``origin_of`` the stored bytes) matches the store's copy, so a KB recreated beside an old
    directory never reads another KB's rows. Files are read through msgspec's typed decoder
    (no pickle: the directory is as open as the KB file beside it), and any file that fails a
    check is ignored: the build decodes the sample and writes the file again.

    At most ``max_samples`` files are written (the feature stage's sample limit: past it no
    build reads rows). Writing is best effort: a full disk or a read-only directory costs the
    next build its decoding, never an ingest or a build."""

    def __init__(self, directory: Path, min_instructions: int, max_samples: int) -> None:
        self.directory = directory
        self.min_instructions = min_instructions
        self.max_samples = max_samples
        self._written: dict[str, Origin] = {}  # sha256 -> origin, by this object
        self._files: int | None = None  # files in the directory, counted once

    def has_room(self) -> bool:
        if self._files is None:
            try:
                with os.scandir(self.directory) as entries:
                    self._files = sum(1 for entry in entries if entry.name.endswith(".rows"))
            except OSError:
                self._files = 0
        return self._files < self.max_samples

    def __contains__(self, sha256: object) -> bool:
        """Written by this object (the origin is then known without reading the store)."""
        return sha256 in self._written

    def add(self, sha256: str, rows: SampleRows, features_blob: bytes) -> None:
        """Keep the rows made from ``features_blob``, the stored bytes of ``sha256``."""
        self.keep(sha256, rows, origin_of(features_blob))

    def keep(self, sha256: str, rows: SampleRows, origin: Origin) -> None:
        if not self.has_room() or not _is_sha256(sha256):
            return
        written = write_rows_file(self.directory, rows, origin, self.min_instructions)
        if written is not None:
            self.adopt(sha256, written)

    def adopt(self, sha256: str, written: WrittenRows) -> None:
        """Make the file ``write_rows_file`` left (by an ingest worker, for the stored sample
        ``sha256``) the rows file of ``sha256``; deleted instead when the cache is full."""
        temporary = Path(written.path)
        try:
            elsewhere = temporary.parent != Path(os.path.abspath(self.directory))
            if not self.has_room() or not _is_sha256(sha256) or elsewhere:
                temporary.unlink(missing_ok=True)
                return
            os.replace(temporary, self.directory / f"{sha256}.rows")
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            return  # best effort (see the class)
        if self._files is not None and sha256 not in self._written:
            self._files += 1
        self._written[sha256] = written.origin

    def prune(self, stored: set[str]) -> None:
        """Delete the files of samples not in ``stored`` (the KB's sha256s): left by a KB that
        was deleted and created again at the same path, they would hold room under
        ``max_samples`` forever. Temporary files of writes a killed process never finished go
        too, once older than ABANDONED_WRITE_SECONDS."""
        try:
            with os.scandir(self.directory) as scan:
                entries = list(scan)
            names = [entry.name for entry in entries if entry.name.endswith(".rows")]
            before = time.time() - ABANDONED_WRITE_SECONDS
            abandoned = [
                entry.path
                for entry in entries
                if entry.name.startswith(_TEMPORARY_PREFIX)
                and entry.stat(follow_symlinks=False).st_mtime < before
            ]
        except OSError:
            return
        for name in names:
            if name.removesuffix(".rows") not in stored:
                with contextlib.suppress(OSError):  # best effort, as every write
                    (self.directory / name).unlink()
                self._written.pop(name.removesuffix(".rows"), None)
        for path in abandoned:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._files = None  # counted again when next asked

    def origin_needed(self, sha256: str) -> bool:
        """Whether ``get`` needs the stored bytes' origin: a file exists that this object did
        not write."""
        return sha256 not in self._written and (self.directory / f"{sha256}.rows").is_file()

    def usable(self, sha256: str, origin: Origin) -> bool:
        """Whether the file of ``sha256`` says it holds rows of this format and
        ``min_instructions`` made from stored bytes of ``origin`` (its header only)."""
        try:
            with open(self.directory / f"{sha256}.rows", "rb") as file:
                header = file.read(_HEADER.size)
        except OSError:
            return False
        return len(header) == _HEADER.size and self._fits(header, origin)

    def _fits(self, header: bytes, origin: Origin) -> bool:
        magic, version, min_instructions, length, crc, _ = _HEADER.unpack_from(header)
        return (
            magic == _MAGIC
            and version == ROW_FORMAT_VERSION
            and min_instructions == self.min_instructions
            and (length, crc) == origin
        )

    def get(self, sha256: str, origin: Origin | None = None) -> SampleRows | None:
        """The cached rows of ``sha256`` when they were made from stored bytes of ``origin``
        (or, without it, by this object), for this ``min_instructions``; else None."""
        expected = self._written.get(sha256) if origin is None else origin
        if expected is None or not _is_sha256(sha256):
            return None
        try:
            with open(self.directory / f"{sha256}.rows", "rb") as file:
                data = file.read(MAX_ROW_FILE_BYTES + 1)
        except OSError:
            return None
        if len(data) < _HEADER.size or len(data) > MAX_ROW_FILE_BYTES:
            return None
        body = memoryview(data)[_HEADER.size :]
        if not self._fits(data, expected) or zlib.crc32(body) != _HEADER.unpack_from(data)[5]:
            return None
        return _decoded(body)


@dataclass(frozen=True, slots=True)
class WrittenRows:
    """A sample's rows written whole by ``write_rows_file`` under a temporary name, for
    ``RowCache.adopt`` once the sample is stored."""

    path: str
    origin: Origin


def write_rows_file(
    directory: Path, rows: SampleRows, origin: Origin, min_instructions: int
) -> WrittenRows | None:
    """``rows`` (made for ``min_instructions`` from stored bytes of ``origin``) written whole
    to a temporary file in ``directory``; None when they cannot be kept or written (best
    effort, as every write of the cache). An ingest worker writes its sample's rows so, and
    sends back the name rather than the rows (~40 % of what it sent, and the parent's encoding
    and writing); a temporary file nobody adopts is deleted by a later build's ``prune``."""
    body = _encoded(rows)
    if body is None:  # a value the file format cannot hold: decoded by every build
        return None
    header = _HEADER.pack(_MAGIC, ROW_FORMAT_VERSION, min_instructions, *origin, zlib.crc32(body))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, dir=directory)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(header + body)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError:
        return None
    return WrittenRows(temporary, origin)


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


# Where ``ingest_groups`` puts the rows its workers make, and a build reads them back.
BuildRows = RowSpool | RowCache


# --------------------------------------------------------------------------- file body


class _Record(msgspec.Struct, array_like=True, frozen=True):
    """A ``SampleRows`` whose stage rows are regular (a ``ColumnBlock``); arrays as their
    little-endian bytes."""

    addresses: list[int]
    sources: list[str]
    numbers: bytes  # uint64 (N, 6)
    minhash: bytes  # uint32 (N, MINHASH_PERMUTATIONS)
    robust_minhash: bytes
    signature_lengths: bytes  # int64 (N, 2)
    int_references: dict[str, tuple[list[int], list[int]]]
    text_references: dict[str, tuple[list[str], list[int]]]
    keys: bytes  # uint64
    key_counts: bytes  # int64 (N,)
    artefact_keys: list[int]
    string_keys: list[int]
    libraries: list[tuple[str, list[str]]]
    functions: int


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(_Record)


def _le(array: npt.NDArray[np.generic]) -> bytes:
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _encoded(rows: SampleRows) -> bytes | None:
    """The file body of ``rows``, or None when they cannot be kept: stage rows of an
    irregular sample (functions instead of columns), or a value msgpack cannot hold (an
    integer past 64 bits, a lone surrogate in a string)."""
    stage, block = rows.stage, rows.stage.block
    if block is None:
        return None
    record = _Record(
        addresses=list(stage.addresses),
        sources=list(stage.sources),
        numbers=_le(block.numbers),
        minhash=_le(block.minhash),
        robust_minhash=_le(block.robust_minhash),
        signature_lengths=_le(block.signature_lengths),
        int_references={k: (list(v), list(c)) for k, (v, c) in block.int_references.items()},
        text_references={k: (list(v), list(c)) for k, (v, c) in block.text_references.items()},
        keys=_le(stage.keys),
        key_counts=_le(stage.key_counts),
        artefact_keys=list(rows.artefacts.keys),
        string_keys=list(rows.artefacts.string_keys),
        libraries=[(name, sorted(names)) for name, names in rows.artefacts.libraries],
        functions=rows.functions,
    )
    try:
        return _ENCODER.encode(record)
    except (msgspec.EncodeError, OverflowError, UnicodeEncodeError):
        return None


def _array(data: bytes, dtype: str, shape: tuple[int, ...]) -> npt.NDArray[Any] | None:
    array = np.frombuffer(data, dtype=np.dtype(dtype))
    expected = int(np.prod(shape))
    return array.reshape(shape) if array.size == expected else None


def _decoded(body: memoryview) -> SampleRows | None:
    """The ``SampleRows`` of a file body, or None when it is not one (every length checked
    against the number of functions, so a build never reads past a column)."""
    try:
        record = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    count = len(record.addresses)
    numbers = _array(record.numbers, "<u8", (count, 6))
    minhash = _array(record.minhash, "<u4", (count, MINHASH_PERMUTATIONS))
    robust = _array(record.robust_minhash, "<u4", (count, MINHASH_PERMUTATIONS))
    lengths = _array(record.signature_lengths, "<i8", (count, 2))
    key_counts = _array(record.key_counts, "<i8", (count,))
    keys = np.frombuffer(record.keys, dtype=np.dtype("<u8"))
    references_ok = set(record.int_references) == set(INT_REFERENCES) and set(
        record.text_references
    ) == set(TEXT_REFERENCES)
    counted = [(len(v), c) for v, c in record.int_references.values()] + [
        (len(v), c) for v, c in record.text_references.values()
    ]
    if (
        numbers is None
        or minhash is None
        or robust is None
        or lengths is None
        or key_counts is None
        or len(record.sources) != count
        or not references_ok
        or int(key_counts.sum()) != keys.size
        or (key_counts < 0).any()
        or not all(
            len(counts) == count and sum(counts) == values and min(counts, default=0) >= 0
            for values, counts in counted
        )
    ):
        return None
    block = ColumnBlock(
        numbers=numbers.astype(np.uint64, copy=False),
        minhash=minhash.astype(np.uint32, copy=False),
        robust_minhash=robust.astype(np.uint32, copy=False),
        signature_lengths=lengths.astype(np.int64, copy=False),
        int_references={k: (v, c) for k, (v, c) in record.int_references.items()},
        text_references={k: (v, c) for k, (v, c) in record.text_references.items()},
    )
    stage = StageRows(
        addresses=tuple(record.addresses),
        sources=tuple(record.sources),
        block=block,
        functions=(),
        keys=keys.astype(np.uint64, copy=False),
        key_counts=key_counts.astype(np.int64, copy=False),
    )
    artefacts = ArtefactRows(
        keys=tuple(record.artefact_keys),
        string_keys=tuple(record.string_keys),
        libraries=tuple((name, frozenset(names)) for name, names in record.libraries),
    )
    return SampleRows(stage=stage, artefacts=artefacts, functions=record.functions)
