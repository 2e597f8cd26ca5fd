"""Several labelled groups through one pool (``ingest_groups``), and ``earmark ingest
--manifest``: the same stored result as one call per group, copies across groups, failures and
crashes, and hostile manifests refused with the line named."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from earmark import ingest_manifest
from earmark.cli import cli
from earmark.config import Limits
from earmark.errors import UsageError
from earmark.freeze import dump_features
from earmark.ingest import (
    IngestGroup,
    IngestOutcome,
    IngestStatus,
    LabelTemplate,
    ingest_groups,
    ingest_paths,
)
from earmark.ingest_manifest import read_manifest
from earmark.ingest_pool import run_in_pool
from earmark.model.kb import Tlp
from earmark.model.sample import SampleFeatures
from earmark.store import SqlStore, open_store
from fixtures.build import FixtureBuilder
from kb_factories import (
    crashing_analyze_bytes,
    fake_analyze_bytes,
    fake_sample_bytes,
    make_features,
)

LAZARUS = LabelTemplate(actor="Lazarus Group", family="contopee", source="case 17-112")
APT28 = LabelTemplate(actor="APT28", family="xagent", source="vendor report", tlp=Tlp.GREEN)
GOODWARE = LabelTemplate(goodware=True, family="zlib")

Claim = tuple[str | None, str | None, bool, str, str]
Rows = tuple[tuple[int, int, int, int, bytes], ...]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    with open_store(str(tmp_path / "kb.db")) as opened:
        yield opened


def stored_state(store: SqlStore) -> dict[str, tuple[str, int, Rows, tuple[Claim, ...]]]:
    """Per sha256: format, function count, function rows and claims, free of row ids and
    times (what a per-group run and a one-pool run must agree on)."""
    table = store.load_function_table()
    rows: dict[int, list[tuple[int, int, int, int, bytes]]] = {}
    for index, sample_id in enumerate(table.sample_id.tolist()):
        rows.setdefault(sample_id, []).append(
            (
                int(table.address[index]),
                int(table.size[index]),
                int(table.instruction_count[index]),
                int(table.exact_hash[index]),
                table.minhash[index].tobytes(),
            )
        )
    state = {}
    for record in store.list_samples():
        claims = tuple(
            sorted(
                (lb.actor, lb.family, lb.goodware, lb.provenance.source, lb.provenance.tlp.value)
                for lb in record.labels
            )
        )
        sample_rows = tuple(sorted(rows.get(record.sample_id, [])))
        assert len(sample_rows) == record.function_count
        state[record.sha256] = (record.format, record.function_count, sample_rows, claims)
    return state


def fake_samples(directory: Path, indexes: range) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in indexes:
        path = directory / f"sample{index:03d}.bin"
        path.write_bytes(fake_sample_bytes(index))
        paths.append(path)
    return paths


def test_real_binaries_match_one_call_per_group(tmp_path: Path, builder: FixtureBuilder) -> None:
    """Compiled fixtures in three groups, one binary in two groups with different labels and
    one twice under the same labels: the one-pool store equals the per-group store."""
    codec_elf = builder.build("fx_codec.c", "gcc64", "O2").stripped
    codec_pe = builder.build("fx_codec.c", "mingw64", "O2").stripped
    dispatch_elf = builder.build("fx_dispatch.c", "gcc64", "O1").stripped
    dispatch_pe = builder.build("fx_dispatch.c", "mingw64", "O0").stripped
    groups = [
        IngestGroup((codec_elf, codec_pe), LAZARUS),
        IngestGroup((dispatch_elf, codec_pe), APT28),  # codec_pe: a second label
        IngestGroup((dispatch_pe, dispatch_pe), GOODWARE),  # the same file twice
    ]
    with open_store(str(tmp_path / "per-group.db")) as per_group:
        for group in groups:
            ingest_paths(per_group, group.paths, group.labels, jobs=2)
        expected = stored_state(per_group)
    seen: list[IngestOutcome] = []

    with open_store(str(tmp_path / "one-pool.db")) as one_pool:
        summary = ingest_groups(one_pool, groups, jobs=2, on_progress=seen.append)
        state = stored_state(one_pool)

    assert state == expected
    codec_pe_sha256 = hashlib.sha256(codec_pe.read_bytes()).hexdigest()
    assert {claim[0] for claim in state[codec_pe_sha256][3]} == {"Lazarus Group", "APT28"}
    assert len(state) == 4 and all(count > 0 for _, count, _, _ in state.values())
    assert list(summary.outcomes) == seen
    assert (summary.ingested, summary.skipped, summary.failed) == (4, 2, 0)
    codec_pe_name = str(codec_pe)
    assert [o.status for o in summary.outcomes if o.name == codec_pe_name] == [
        IngestStatus.INGESTED,
        IngestStatus.SKIPPED,
    ]


@pytest.mark.parametrize("jobs", [1, 2])
def test_copy_met_while_its_first_copy_is_analysed(tmp_path: Path, jobs: int) -> None:
    """With a pool, the second group's copy is met while the first is queued or in flight: it
    waits for the result, then gets its own label (in one process the first is stored by
    then); the same labels in two groups are recorded once."""
    (first,) = fake_samples(tmp_path / "a", range(1))
    copy = tmp_path / "b" / "copy.bin"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    others = fake_samples(tmp_path / "c", range(1, 6))
    groups = [
        IngestGroup((first,), LAZARUS),
        IngestGroup((copy, *others), APT28),
        IngestGroup((first,), APT28),
    ]
    with open_store(str(tmp_path / "kb.db")) as store:
        summary = ingest_groups(store, groups, jobs=jobs, analyzer=fake_analyze_bytes)
        record = store.get_sample(hashlib.sha256(first.read_bytes()).hexdigest())

    assert record is not None

    assert (summary.ingested, summary.skipped, summary.failed) == (6, 2, 0)
    assert sorted((lb.actor, lb.provenance.source) for lb in record.labels) == [
        ("APT28", "vendor report"),
        ("Lazarus Group", "case 17-112"),
    ]


def test_copies_of_a_refused_sample_fail_alike(store: SqlStore, tmp_path: Path) -> None:
    refused = tmp_path / "a" / "notes.bin"
    refused.parent.mkdir()
    refused.write_bytes(b"not a sample at all")
    copy = tmp_path / "b" / "notes-copy.bin"
    copy.parent.mkdir()
    shutil.copy(refused, copy)
    fake_samples(tmp_path / "b", range(3))

    summary = ingest_groups(
        store,
        [IngestGroup((refused,), LAZARUS), IngestGroup((tmp_path / "b",), APT28)],
        jobs=2,
        analyzer=fake_analyze_bytes,
    )

    assert summary.ingested == 3
    assert sorted((Path(f.name).name, f.error_type) for f in summary.failures) == [
        ("notes-copy.bin", "UnsupportedFormatError"),
        ("notes.bin", "UnsupportedFormatError"),
    ]
    assert store.stats().samples == 3


@pytest.mark.parametrize("jobs", [1, 2])
def test_frozen_features_of_a_refused_sample_are_stored(tmp_path: Path, jobs: int) -> None:
    """A copy that cannot be analysed does not take the frozen features of the same sample
    down with it (separate calls would store them)."""
    refused = tmp_path / "a" / "refused.bin"
    refused.parent.mkdir()
    refused.write_bytes(b"no fake sample magic here")
    features = make_features("frozen", 6, sha256=hashlib.sha256(refused.read_bytes()).hexdigest())
    dump_features(features, tmp_path / "features.emf")

    with open_store(str(tmp_path / "kb.db")) as store:
        summary = ingest_groups(
            store,
            [IngestGroup((refused,), LAZARUS), IngestGroup((tmp_path / "features.emf",), APT28)],
            jobs=jobs,
            analyzer=fake_analyze_bytes,
        )
        (record,) = store.list_samples()

    assert summary.ingested == 1
    assert [Path(f.name).name for f in summary.failures] == ["refused.bin"]
    assert record.sha256 == features.sha256 and record.actors == {"APT28"}


def test_a_crash_in_one_group_costs_only_its_file(store: SqlStore, tmp_path: Path) -> None:
    crash = tmp_path / "a" / "crash.bin"
    fake_samples(tmp_path / "a", range(4))
    crash.write_bytes(b"CRASH" + fake_sample_bytes(99))
    fake_samples(tmp_path / "b", range(4, 8))
    shutil.copy(crash, tmp_path / "b" / "crash-copy.bin")

    summary = ingest_groups(
        store,
        [IngestGroup((tmp_path / "a",), LAZARUS), IngestGroup((tmp_path / "b",), APT28)],
        jobs=2,
        analyzer=crashing_analyze_bytes,
    )

    assert summary.ingested == 8
    assert sorted(Path(f.name).name for f in summary.failures) == ["crash-copy.bin", "crash.bin"]
    assert all("crashed" in (f.error or "") for f in summary.failures)
    actors = {r.sha256: r.actors for r in store.list_samples()}
    assert sorted(len(a) for a in actors.values()) == [1] * 8


def test_known_samples_across_groups_get_every_label(store: SqlStore, tmp_path: Path) -> None:
    paths = fake_samples(tmp_path / "in", range(3))
    ingest_paths(store, paths, LAZARUS, analyzer=fake_analyze_bytes)
    revision = store.revision()

    again = ingest_groups(
        store,
        [IngestGroup(tuple(paths), LAZARUS), IngestGroup(tuple(paths[:1]), APT28)],
        jobs=2,
        analyzer=fake_analyze_bytes,
    )

    assert (again.ingested, again.skipped) == (0, 4)
    assert store.revision() == revision + 1  # one new claim, nothing else written
    assert sorted(len(r.labels) for r in store.list_samples()) == [1, 1, 2]


def slow_analyze_bytes(data: bytes, limits: Limits) -> SampleFeatures:
    """fake_analyze_bytes, slowly for "sample 0": later files finish before it."""
    if data.endswith(b"sample 0"):
        time.sleep(0.5)
    return crashing_analyze_bytes(data, limits)


def test_samples_are_written_in_input_order(store: SqlStore, tmp_path: Path) -> None:
    """Sample ids follow the inputs, whatever finishes first (a crash in the middle too, and
    a frozen features file met while earlier files are analysed), so two builds of one
    collection agree on them."""
    paths = fake_samples(tmp_path / "a", range(12))
    crash = tmp_path / "a" / "sample005-crash.bin"
    crash.write_bytes(b"CRASH" + fake_sample_bytes(99))
    more = fake_samples(tmp_path / "b", range(12, 20))
    frozen = make_features("frozen", 4)
    dump_features(frozen, tmp_path / "b" / "sample012-frozen.emf")  # sorts before sample012.bin

    summary = ingest_groups(
        store,
        [IngestGroup((tmp_path / "a",), LAZARUS), IngestGroup((tmp_path / "b",), APT28)],
        jobs=2,
        analyzer=slow_analyze_bytes,
    )

    assert (summary.ingested, summary.failed) == (21, 1)
    expected = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    expected += [frozen.sha256] + [hashlib.sha256(p.read_bytes()).hexdigest() for p in more]
    assert [r.sha256 for r in store.list_samples()] == expected
    assert [Path(o.name).name for o in summary.outcomes][5:7] == [
        "sample005-crash.bin",
        "sample005.bin",
    ]


def _rank_after_a_pause(rank: int) -> int:
    time.sleep(0.4 if rank == 0 else 0.0)
    return rank


def _submit_rank(pool: ProcessPoolExecutor, rank: int) -> Future[int]:
    return pool.submit(_rank_after_a_pause, rank)


def test_pool_hands_results_over_in_order_with_a_full_hold() -> None:
    """The first job is slow: later results wait, at most workers x held_per_worker of them,
    and every result still arrives, in order."""
    finished: list[int] = []
    run_in_pool(
        iter(range(15)),
        _submit_rank,
        lambda rank, result: finished.append(result),
        lambda rank: pytest.fail(f"job {rank} crashed"),
        workers=2,
        queued_per_worker=2,
        held_per_worker=1,
    )
    assert finished == list(range(15))


# --------------------------------------------------------------------------- manifest


def write_manifest(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    manifest.write_text(text)
    return manifest


def test_manifest_rows_become_groups(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "collection",
        "\ufeffPath,Actor,family,source,tlp,goodware\n"
        "lazarus/a.exe,Lazarus Group,contopee,case 17-112,AMBER,\n"
        "lazarus/b.exe,Lazarus Group,contopee,case 17-112,amber,no\n"
        ",,,,,\n"
        "\n"
        "runtimes/,,zlib,,TLP:CLEAR,yes\n"
        "/abs/c.exe,,,,,\n",
    )

    groups = read_manifest(manifest, LabelTemplate(source="sweep"))

    folder = tmp_path / "collection"
    assert groups == (
        IngestGroup((folder / "lazarus/a.exe", folder / "lazarus/b.exe"), LAZARUS),
        IngestGroup(
            (folder / "runtimes",),
            LabelTemplate(family="zlib", goodware=True, source="sweep", tlp=Tlp.CLEAR),
        ),
        IngestGroup((Path("/abs/c.exe"),), LabelTemplate(source="sweep")),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,actor,famly\na.exe,x,y\n", "line 1: unknown column 'famly'"),
        ("actor,family\nx,y\n", "line 1: the header has no path column"),
        ("path,path\na.exe,b.exe\n", "line 1: a column is named twice"),
        ("path,tlp\na.exe,amber\nb.exe,purple\n", "line 3: tlp 'purple' is not one of"),
        ("path,goodware\na.exe,maybe\n", "line 2: goodware 'maybe' is not yes/no"),
        ("path,actor,goodware\na.exe,APT28,yes\n", "line 2: a sample cannot be goodware"),
        ("path,actor\na.exe,APT\x1b[31m28\n", "line 2: actor holds a control character"),
        ("path,actor\n,APT28\n", "line 2: the path is empty"),
        ("path,actor\na.exe,APT28,extra\n", "line 2: 3 cells, but the header names 2"),
        ('path,actor\na.exe,"APT28\n', "not valid CSV"),
        ("path,actor\n" + "a" * 5000 + ",x\n", "line 2: a cell is over 4096 characters"),
        ("", "is empty"),
    ],
)
def test_bad_manifests_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    manifest = write_manifest(tmp_path, text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_manifest(manifest)


def test_manifest_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_text = tmp_path / "binary.csv"
    not_text.write_bytes(b"path\n\xff\xfe\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        read_manifest(not_text)
    monkeypatch.setattr(ingest_manifest, "MAX_MANIFEST_ROWS", 50)
    rows = "".join(f"s{index}.exe\n" for index in range(50))
    assert len(read_manifest(write_manifest(tmp_path / "full", "path\n" + rows))[0].paths) == 50
    too_long = write_manifest(tmp_path / "long", "path\n" + rows + "one-more.exe\n")
    with pytest.raises(UsageError, match="over 50 rows: split the collection"):
        read_manifest(too_long)
    monkeypatch.setattr(ingest_manifest, "MAX_MANIFEST_BYTES", 1024)
    with pytest.raises(UsageError, match="is over 1,024 bytes"):
        read_manifest(write_manifest(tmp_path / "large", "path\n" + "x.exe\n" * 200))


def test_cli_manifest_imports_a_collection(tmp_path: Path, builder: FixtureBuilder) -> None:
    """One command for a labelled collection: every row's labels stored, a missing file fails
    alone (exit code 10, the rest ingested), and a bad row writes nothing."""
    collection = tmp_path / "collection"
    (collection / "lazarus").mkdir(parents=True)
    (collection / "runtimes").mkdir()
    shutil.copy(builder.build("fx_codec.c", "mingw64", "O2").stripped, collection / "lazarus")
    shutil.copy(builder.build("fx_dispatch.c", "gcc64", "O2").stripped, collection / "runtimes")
    manifest = write_manifest(
        collection,
        "path,actor,family,source,tlp,goodware\n"
        "lazarus/,Lazarus Group,contopee,case 17-112,,\n"
        "runtimes/,,,,green,yes\n"
        "lazarus/gone.exe,Lazarus Group,contopee,,,\n",
    )
    database = str(tmp_path / "kb.db")
    runner = CliRunner()

    result = runner.invoke(
        cli, ["ingest", "--db", database, "--manifest", str(manifest), "--jobs", "2"]
    )

    assert result.exit_code == 10, result.output
    assert "ingested 2, skipped 0 (already known: labels added), failed 1" in result.output
    assert "gone.exe" in result.output
    with open_store(database) as store:
        records = {r.format: r for r in store.list_samples()}
    assert records["pe"].actors == {"Lazarus Group"}
    assert records["elf"].goodware and records["elf"].labels[0].provenance.tlp is Tlp.GREEN
    assert records["elf"].labels[0].provenance.source == "ingest"

    bad = write_manifest(tmp_path / "bad", "path,tlp\nx.exe,green\ny.exe,purple\n")
    fresh = str(tmp_path / "fresh.db")
    refused = runner.invoke(cli, ["ingest", "--db", fresh, "--manifest", str(bad)])
    assert refused.exit_code == 2 and "line 3: tlp 'purple'" in refused.output
    assert not Path(fresh).exists()
    both = runner.invoke(cli, ["ingest", "--db", fresh, "--manifest", str(bad), "x.exe"])
    assert both.exit_code == 2 and "one of them" in both.output
