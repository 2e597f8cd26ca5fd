"""Small builders of SampleFeatures and labels for store and ingest tests.

The values are derived from a seed (or from file bytes), so two calls with the same input give
equal features and tests can compare what they stored with what they read back.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
from datetime import UTC, datetime

from earmark.config import Limits
from earmark.errors import UnsupportedFormatError
from earmark.model.kb import Provenance, SampleLabel, Tlp
from earmark.model.sample import (
    FEATURES_FORMAT_VERSION,
    MINHASH_PERMUTATIONS,
    FunctionFeatures,
    PeInfo,
    RichEntry,
    RichHeader,
    SampleFeatures,
)

FAKE_SAMPLE_MAGIC = b"FAKESAMPLE"


def make_function(rng: random.Random, address: int) -> FunctionFeatures:
    return FunctionFeatures(
        address=address,
        size=rng.randrange(1, 5000),
        block_count=rng.randrange(1, 50),
        edge_count=rng.randrange(0, 80),
        instruction_count=rng.randrange(1, 2000),
        exact_hash=rng.getrandbits(64),  # half of them have the top bit set (signed storage)
        minhash=tuple(rng.getrandbits(32) for _ in range(MINHASH_PERMUTATIONS)),
        normalized=("push reg", "mov reg, reg"),
        calls=(),
        called_imports=("kernel32.dll!Sleep",),
        strings=("hello",),
        constants=(0xEDB88320,),
        name=f"sub_{address:x}",
        source="symbol",
    )


def make_features(
    seed: int | str | bytes, function_count: int = 5, *, sha256: str | None = None
) -> SampleFeatures:
    rng = random.Random(seed)
    digest_source = repr(seed).encode()
    functions = tuple(make_function(rng, 0x1000 + 0x100 * index) for index in range(function_count))
    if function_count:  # one address above 2**63, as a kernel-space VA would be
        functions = (*functions[:-1], make_function(rng, 0xFFFF_F800_0000_1000))
    return SampleFeatures(
        format_version=FEATURES_FORMAT_VERSION,
        analyzer_version="test",
        sha256=sha256 or hashlib.sha256(digest_source).hexdigest(),
        sha1=hashlib.sha1(digest_source).hexdigest(),
        md5=hashlib.md5(digest_source).hexdigest(),
        size=rng.randrange(1000, 100_000),
        format="pe",
        arch="x86_64",
        bits=64,
        image_base=0x140000000,
        entry_points=(0x1000,),
        tlsh="T1" + "A" * 70,
        sections=(),
        imports=(),
        exports=(),
        strings=(),
        functions=functions,
        pe=PeInfo(
            timestamp=1_600_000_000,
            linker_version="14.29",
            os_version="6.0",
            subsystem="console",
            characteristics=(),
            imphash="0" * 32,
            rich_header=RichHeader(
                key=0x1234, entries=(RichEntry(259, 30133, 4),), checksum_valid=True
            ),
            pdb_path=r"C:\build\x.pdb",
            pdb_guid=None,
            pdb_age=None,
            signers=(),
            version_info=(),
            resource_languages=(),
        ),
        elf=None,
        warnings=(),
        analysis_seconds=0.01,
    )


def fake_analyze_bytes(data: bytes, limits: Limits) -> SampleFeatures:
    """Stand-in for earmark.extract.analyze_bytes: features derived from the bytes.

    Bytes that do not start with FAKE_SAMPLE_MAGIC are refused as an unsupported format, so
    tests can check that failures are reported per file.
    """
    if not data.startswith(FAKE_SAMPLE_MAGIC):
        raise UnsupportedFormatError("not a fake sample")
    function_count = data[len(FAKE_SAMPLE_MAGIC)] if len(data) > len(FAKE_SAMPLE_MAGIC) else 3
    return make_features(data, function_count, sha256=hashlib.sha256(data).hexdigest())


def fake_sample_bytes(index: int, function_count: int = 4) -> bytes:
    return FAKE_SAMPLE_MAGIC + bytes([function_count]) + f"sample {index}".encode()


def make_label(
    actor: str | None = "Lazarus Group",
    family: str | None = "contopee",
    goodware: bool = False,
    source: str = "case 17-112",
    tlp: Tlp = Tlp.AMBER,
) -> SampleLabel:
    return SampleLabel(
        actor=actor,
        family=family,
        goodware=goodware,
        provenance=Provenance(source=source, recorded_at=datetime(2024, 5, 1, tzinfo=UTC), tlp=tlp),
    )


def crashing_analyze_bytes(data: bytes, limits: Limits) -> SampleFeatures:
    """Like fake_analyze_bytes, but bytes starting with b"CRASH" kill the (worker) process, as
    a segfault in a native parser would. Only use it with jobs > 1."""
    if data.startswith(b"CRASH"):
        os.kill(os.getpid(), signal.SIGKILL)
    return fake_analyze_bytes(data, limits)


def refusing_analyze_bytes(data: bytes, limits: Limits) -> SampleFeatures:
    """For tests where analysis must not happen at all."""
    raise AssertionError("analysis was run on a sample that needed none")
