"""Ingest: directories, zip archives (plain, AES and ZipCrypto with "infected"), frozen features,
deduplication, idempotency, worker crashes, and a batch killed with SIGKILL mid-way."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pyzipper

from earmark.config import Limits
from earmark.errors import UsageError
from earmark.freeze import dump_features
from earmark.ingest import IngestOutcome, IngestStatus, LabelTemplate, ingest_paths
from earmark.model.kb import Tlp
from earmark.store import SqlStore, open_store
from fixtures.build import FixtureBuilder
from kb_factories import (
    crashing_analyze_bytes,
    fake_analyze_bytes,
    fake_sample_bytes,
    make_features,
    refusing_analyze_bytes,
)

LAZARUS = LabelTemplate(actor="Lazarus Group", family="contopee", source="case 17-112")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    with open_store(str(tmp_path / "kb.db")) as opened:
        yield opened


def write_samples(directory: Path, count: int, start: int = 0, functions: int = 4) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = directory / f"sample{index:04d}.bin"
        path.write_bytes(fake_sample_bytes(index, functions))
        paths.append(path)
    return paths


def assert_every_sample_complete(store: SqlStore) -> None:
    """Each stored sample has all its function rows, its features blob and its label."""
    table = store.load_function_table()
    rows_per_sample = Counter(table.sample_id.tolist())
    for record in store.list_samples():
        features = store.load_features(record.sha256)
        assert record.function_count == len(features.functions)
        assert rows_per_sample[record.sample_id] == record.function_count
        assert len(record.labels) == 1


def test_directory_is_ingested_recursively(store: SqlStore, tmp_path: Path) -> None:
    write_samples(tmp_path / "in", 3)
    write_samples(tmp_path / "in" / "nested" / "deeper", 2, start=3)
    (tmp_path / "in" / "notes.txt").write_text("not a sample")
    (tmp_path / "in" / "empty.bin").write_bytes(b"")
    seen: list[IngestOutcome] = []

    summary = ingest_paths(
        store, [tmp_path / "in"], LAZARUS, analyzer=fake_analyze_bytes, on_progress=seen.append
    )

    assert (summary.ingested, summary.skipped, summary.failed) == (5, 0, 2)
    assert list(summary.outcomes) == seen
    failures = {Path(f.name).name: (f.error_type, f.exit_code) for f in summary.failures}
    assert failures == {
        "notes.txt": ("UnsupportedFormatError", 13),
        "empty.bin": ("EmptyFileError", 11),
    }
    records = store.list_samples()
    assert len(records) == 5
    assert all(r.actors == {"Lazarus Group"} and r.families == {"contopee"} for r in records)
    assert all(r.labels[0].provenance.source == "case 17-112" for r in records)
    assert_every_sample_complete(store)


def test_ingest_is_idempotent_and_relabels(store: SqlStore, tmp_path: Path) -> None:
    write_samples(tmp_path / "in", 4)
    ingest_paths(store, [tmp_path / "in"], LAZARUS, analyzer=fake_analyze_bytes)
    revision = store.revision()
    stats = store.stats()

    again = ingest_paths(store, [tmp_path / "in"], LAZARUS, analyzer=fake_analyze_bytes)
    assert (again.ingested, again.skipped) == (0, 4)
    assert store.stats() == stats and store.revision() == revision

    vendor = LabelTemplate(family="bankshot", source="vendor report", tlp=Tlp.GREEN)
    relabelled = ingest_paths(store, [tmp_path / "in"], vendor, analyzer=fake_analyze_bytes)
    assert relabelled.skipped == 4
    assert store.stats().functions == stats.functions
    assert all(r.families == {"contopee", "bankshot"} for r in store.list_samples())


def test_known_samples_are_not_analysed_again(store: SqlStore, tmp_path: Path) -> None:
    write_samples(tmp_path / "in", 2)
    ingest_paths(store, [tmp_path / "in"], LAZARUS, analyzer=fake_analyze_bytes)
    summary = ingest_paths(store, [tmp_path / "in"], LAZARUS, analyzer=refusing_analyze_bytes)
    assert summary.skipped == 2 and summary.failed == 0


def test_duplicates_inside_a_batch_are_analysed_once(store: SqlStore, tmp_path: Path) -> None:
    (sample,) = write_samples(tmp_path / "in", 1)
    shutil.copy(sample, tmp_path / "in" / "copy.bin")
    summary = ingest_paths(store, [tmp_path / "in", sample], LAZARUS, analyzer=fake_analyze_bytes)
    assert (summary.ingested, summary.skipped) == (1, 2)
    assert store.stats().samples == 1


def make_zip(path: Path, members: dict[str, bytes], password: bytes | None = None) -> Path:
    encryption = pyzipper.WZ_AES if password else None
    with pyzipper.AESZipFile(
        path, "w", compression=pyzipper.ZIP_DEFLATED, encryption=encryption
    ) as archive:
        if password:
            archive.setpassword(password)
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_zip_archives_plain_and_aes_infected(store: SqlStore, tmp_path: Path) -> None:
    plain = make_zip(tmp_path / "plain.zip", {"a.bin": fake_sample_bytes(1), "dir/": b""})
    aes = make_zip(tmp_path / "aes.zip", {"b.bin": fake_sample_bytes(2)}, password=b"infected")
    other = make_zip(tmp_path / "secret.zip", {"c.bin": fake_sample_bytes(3)}, password=b"secret")

    summary = ingest_paths(store, [plain, aes, other], LAZARUS, analyzer=fake_analyze_bytes)

    assert sorted(o.name for o in summary.outcomes if o.status is IngestStatus.INGESTED) == [
        f"{aes}!b.bin",
        f"{plain}!a.bin",
    ]
    (failure,) = summary.failures
    assert failure.name == f"{other}!c.bin" and "password" in (failure.error or "")
    assert_every_sample_complete(store)


@pytest.mark.skipif(shutil.which("zip") is None, reason="Info-ZIP `zip` writes ZipCrypto archives")
def test_zipcrypto_archive_with_community_password(store: SqlStore, tmp_path: Path) -> None:
    (sample,) = write_samples(tmp_path / "in", 1)
    archive = tmp_path / "zipcrypto.zip"
    subprocess.run(
        ["zip", "-q", "-j", "-P", "infected", str(archive), str(sample)], check=True, timeout=60
    )
    summary = ingest_paths(store, [archive], LAZARUS, analyzer=fake_analyze_bytes)
    assert summary.ingested == 1


def test_archive_members_are_bounded(store: SqlStore, tmp_path: Path) -> None:
    big = fake_sample_bytes(1) + b"\x00" * 10_000  # compresses to a few bytes: a tiny bomb
    hostile_name = "evil\x1b[31m.bin"
    archive = make_zip(tmp_path / "bomb.zip", {"big.bin": big, hostile_name: fake_sample_bytes(2)})
    limits = Limits(max_archive_member_bytes=1_000)

    summary = ingest_paths(store, [archive], LAZARUS, limits=limits, analyzer=fake_analyze_bytes)

    (failure,) = summary.failures
    assert failure.name.endswith("!big.bin") and failure.error_type == "FileTooLargeError"
    (ingested,) = [o for o in summary.outcomes if o.status is IngestStatus.INGESTED]
    assert "\x1b" not in ingested.name and ingested.name.endswith("!evil?[31m.bin")


def test_damaged_zip_is_a_per_file_failure(store: SqlStore, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(b"PK\x03\x04" + b"\xff" * 100)
    write_samples(tmp_path / "in", 1)
    summary = ingest_paths(store, [damaged, tmp_path / "in"], LAZARUS, analyzer=fake_analyze_bytes)
    assert summary.ingested == 1
    assert [f.error_type for f in summary.failures] == ["MalformedFileError"]


def test_frozen_features_files_are_stored_without_analysis(store: SqlStore, tmp_path: Path) -> None:
    features = make_features("frozen", 6)
    dump_features(features, tmp_path / "sample.emf")
    (tmp_path / "broken.emf").write_bytes(b"EARMARKF" + b"\x00" * 40)

    summary = ingest_paths(
        store,
        [tmp_path / "sample.emf", tmp_path / "broken.emf"],
        LAZARUS,
        analyzer=refusing_analyze_bytes,
    )

    assert summary.ingested == 1
    (failure,) = summary.failures
    assert failure.error_type is not None and failure.error_type.startswith("Features")
    assert store.load_features(features.sha256) == features


def test_missing_path_is_reported(store: SqlStore, tmp_path: Path) -> None:
    summary = ingest_paths(store, [tmp_path / "absent"], LAZARUS, analyzer=fake_analyze_bytes)
    assert [(f.error_type, f.exit_code) for f in summary.failures] == [("InputError", 10)]


def test_process_pool_gives_the_same_result(store: SqlStore, tmp_path: Path) -> None:
    write_samples(tmp_path / "in", 12)
    summary = ingest_paths(store, [tmp_path / "in"], LAZARUS, jobs=2, analyzer=fake_analyze_bytes)
    assert summary.ingested == 12
    assert_every_sample_complete(store)


def test_a_crashing_worker_costs_only_its_file(store: SqlStore, tmp_path: Path) -> None:
    write_samples(tmp_path / "in", 6)
    (tmp_path / "in" / "crash.bin").write_bytes(b"CRASH" + fake_sample_bytes(99))
    summary = ingest_paths(
        store, [tmp_path / "in"], LAZARUS, jobs=2, analyzer=crashing_analyze_bytes
    )
    assert summary.ingested == 6
    (failure,) = summary.failures
    assert failure.name.endswith("crash.bin") and "crashed" in (failure.error or "")


def test_label_templates() -> None:
    assert LabelTemplate(source="feed").label(datetime.now(UTC)) is None
    goodware = LabelTemplate(goodware=True, family="openssl").label(datetime.now(UTC))
    assert goodware is not None and goodware.goodware and goodware.actor is None
    with pytest.raises(UsageError):
        LabelTemplate(actor="APT28", goodware=True)
    with pytest.raises(UsageError):
        LabelTemplate(actor="APT28", source=" ")


def test_jobs_must_be_positive(store: SqlStore) -> None:
    with pytest.raises(UsageError):
        ingest_paths(store, [], jobs=0)


KILLED_BATCH_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    from earmark.ingest import LabelTemplate, ingest_paths
    from earmark.store import open_store
    from kb_factories import fake_analyze_bytes

    with open_store(sys.argv[1]) as store:
        ingest_paths(
            store, [sys.argv[2]], LabelTemplate(actor="Lazarus Group", source="killed batch"),
            analyzer=fake_analyze_bytes,
            on_progress=lambda outcome: print(outcome.status, flush=True),
        )
    print("finished", flush=True)
    """
)


@pytest.mark.slow
def test_batch_killed_mid_way_leaves_only_whole_samples(tmp_path: Path) -> None:
    sample_count = 150
    write_samples(tmp_path / "in", sample_count, functions=120)
    database = tmp_path / "kb.db"
    script = tmp_path / "ingest_batch.py"
    script.write_text(KILLED_BATCH_SCRIPT)
    tests_dir = str(Path(__file__).parent)
    process = subprocess.Popen(
        [sys.executable, str(script), str(database), str(tmp_path / "in"), tests_dir],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    written = 0
    try:
        for line in process.stdout:
            assert line.strip() != "finished", "the batch ended before it could be killed"
            written += 1
            if written == 30:
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL

    with open_store(str(database)) as store:
        stored = store.stats().samples
        assert written <= stored < sample_count
        assert_every_sample_complete(store)
        resumed = ingest_paths(
            store,
            [tmp_path / "in"],
            LabelTemplate(actor="Lazarus Group", source="killed batch"),
            analyzer=fake_analyze_bytes,
        )
        assert resumed.ingested == sample_count - stored and resumed.skipped == stored
        assert store.stats().samples == sample_count
        assert_every_sample_complete(store)


def test_real_binaries_end_to_end(store: SqlStore, tmp_path: Path, builder: FixtureBuilder) -> None:
    """The default analyser (earmark.extract) on compiled fixtures, one loose and one zipped."""
    elf = builder.build("fx_codec.c", "gcc64", "O2").stripped
    pe = builder.build("fx_codec.c", "mingw64", "O2").stripped
    archive = make_zip(tmp_path / "pe.zip", {"codec.exe": pe.read_bytes()}, password=b"infected")

    summary = ingest_paths(store, [elf, archive], LAZARUS, jobs=2)

    assert summary.failures == () and summary.ingested == 2
    records = {r.format: r for r in store.list_samples()}
    assert set(records) == {"elf", "pe"}
    assert all(r.function_count > 0 for r in records.values())
    assert_every_sample_complete(store)
