"""What extraction knows about one sample: metadata, strings and per-function features.

These values are frozen: they are written once by ``earmark.extract`` and read by every later
stage (store, index, correlate) from a features file, never by disassembling again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Version of the frozen features format (see docs/features-format.md). Bump the major part
# when a field changes meaning or the signature scheme changes (old files are then refused
# with FeaturesVersionError); bump the minor part when a field is only added.
FEATURES_FORMAT_VERSION = "1.1"

# Number of MinHash permutations per function. Measured in docs/benchmarks.md: 64 keeps the
# Jaccard estimate within ±0.06 (1 sigma = sqrt(J(1-J)/64) <= 0.0625) at a quarter of 256's cost.
MINHASH_PERMUTATIONS = 64

SampleFormat = Literal["pe", "elf"]
Arch = Literal["x86", "x86_64"]


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    virtual_address: int
    virtual_size: int
    raw_offset: int
    raw_size: int
    entropy: float
    flags: tuple[str, ...]  # e.g. ("read", "write", "execute", "code", "initialized_data")


@dataclass(frozen=True, slots=True)
class Import:
    library: str
    name: str  # function name, or "#<ordinal>" when imported by ordinal
    address: int  # VA of the IAT slot (PE) or PLT/GOT entry (ELF); 0 when unknown


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    address: int
    ordinal: int | None


@dataclass(frozen=True, slots=True)
class StringRef:
    offset: int  # file offset of the first byte
    encoding: Literal["ascii", "utf-16le"]
    value: str


@dataclass(frozen=True, slots=True)
class RichEntry:
    product_id: int
    build: int
    count: int


@dataclass(frozen=True, slots=True)
class RichHeader:
    key: int  # the XOR key as stored
    entries: tuple[RichEntry, ...]
    checksum_valid: bool  # stored key equals the checksum recomputed over DOS header + entries


@dataclass(frozen=True, slots=True)
class Signer:
    subject: str
    issuer: str
    serial: str
    sha1: str  # fingerprint of the signing certificate


@dataclass(frozen=True, slots=True)
class PeInfo:
    timestamp: int
    linker_version: str  # "14.29"
    os_version: str
    subsystem: str
    characteristics: tuple[str, ...]
    imphash: str | None
    rich_header: RichHeader | None
    pdb_path: str | None
    pdb_guid: str | None
    pdb_age: int | None
    signers: tuple[Signer, ...]
    version_info: tuple[tuple[str, str], ...]  # (key, value) pairs from VS_VERSIONINFO
    resource_languages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ElfInfo:
    os_abi: str
    elf_type: str  # "EXEC", "DYN", "REL"
    interpreter: str | None
    needed: tuple[str, ...]
    build_id: str | None
    comment: tuple[str, ...]  # .comment strings, e.g. "GCC: (Debian 12.2.0-14) 12.2.0"


@dataclass(frozen=True, slots=True)
class FunctionFeatures:
    """One recovered function. Addresses are virtual addresses of the sample."""

    address: int
    size: int  # bytes from start to end of the last instruction reached
    block_count: int
    edge_count: int
    instruction_count: int
    # 64-bit hash of the normalised stream; equal for byte-different but relocated copies.
    exact_hash: int
    # MINHASH_PERMUTATIONS unsigned 32-bit values over shingles of the normalised stream.
    minhash: tuple[int, ...]
    # One token per instruction: mnemonic plus operand classes, addresses masked.
    normalized: tuple[str, ...]
    calls: tuple[int, ...]  # VAs of called functions inside the sample
    called_imports: tuple[str, ...]  # "library!name" of called imports
    strings: tuple[str, ...]  # strings whose address the function references
    constants: tuple[int, ...]  # distinctive non-address immediates (masks, magic numbers)
    name: str | None  # symbol name where the file has one (ground truth; not used to match)
    source: str  # how the start was found: symbol, export, entry, pdata, eh_frame, call, tail, ...
    # Added in format 1.1 (docs/function-similarity.md). MINHASH_PERMUTATIONS values over 1..3-grams
    # of the optimisation-robust stream (register moves, spills and frame set-up dropped; loads,
    # stores and arithmetic kept); () when the file predates 1.1.
    robust_minhash: tuple[int, ...] = ()
    # Small immediate operands left in the normalised stream (shift counts, compare bounds,
    # masks), without 0/1/-1 and stack offsets; () when the file predates 1.1.
    immediates: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SampleFeatures:
    format_version: str
    analyzer_version: str
    sha256: str
    sha1: str
    md5: str
    size: int
    format: SampleFormat
    arch: Arch
    bits: int
    image_base: int
    entry_points: tuple[int, ...]
    tlsh: str | None
    sections: tuple[Section, ...]
    imports: tuple[Import, ...]
    exports: tuple[Export, ...]
    strings: tuple[StringRef, ...]
    functions: tuple[FunctionFeatures, ...]
    pe: PeInfo | None
    elf: ElfInfo | None
    warnings: tuple[str, ...]  # limits hit and recoverable oddities, for the analyst
    analysis_seconds: float
