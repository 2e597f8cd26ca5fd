"""Benign-infrastructure suppression: MISP warninglists plus earmark's shared services."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from earmark.errors import IntelError
from earmark.intel.warninglist_tables import (
    WARNINGLIST_BLOCK_KEYS,
    KeyFile,
    compile_warninglists,
    load_tables,
    save_tables,
    table_key,
)
from earmark.intel.warninglists import (
    CACHE_DIR_ENV_VAR,
    BenignInfrastructure,
    WarninglistData,
    default_benign_infrastructure,
    default_warninglist_tables,
    load_shared_services,
)
from earmark.model.intel import Indicator, IndicatorType


@pytest.fixture(scope="module")
def benign() -> BenignInfrastructure:
    return default_benign_infrastructure()


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (IndicatorType.IPV4, "8.8.8.8"),  # public DNS resolver
        (IndicatorType.IPV4, "104.16.0.5"),  # Cloudflare CDN range
        (IndicatorType.DOMAIN, "webhook.site"),  # earmark shared services
        (IndicatorType.URL, "https://webhook.site/0d3b7a4e"),
        (IndicatorType.DOMAIN, "od.lk"),
        (IndicatorType.DOMAIN, "mireene.com"),
        (IndicatorType.DOMAIN, "ddns.net"),  # the dynamic-DNS suffix itself
        (IndicatorType.DOMAIN, "www.google.com"),
        (IndicatorType.IPV4, "10.1.2.3"),  # RFC 1918
    ],
)
def test_shared_and_public_values_are_benign(
    benign: BenignInfrastructure, kind: IndicatorType, value: str
) -> None:
    assert benign.is_benign(Indicator(kind, value)) is not None


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (IndicatorType.DOMAIN, "evil-c2.ddns.net"),  # a customer under a dynamic-DNS suffix
        (IndicatorType.DOMAIN, "kimsuky-panel.mireene.com"),  # a free-hosting customer
        (IndicatorType.DOMAIN, "journalide.org"),
        (IndicatorType.IPV4, "172.93.201.88"),
    ],
)
def test_operator_values_are_not_benign(
    benign: BenignInfrastructure, kind: IndicatorType, value: str
) -> None:
    assert benign.is_benign(Indicator(kind, value)) is None


def test_customer_suffix_is_reported_for_dynamic_dns(benign: BenignInfrastructure) -> None:
    assert benign.customer_suffix("evil-c2.ddns.net") == "ddns.net"
    assert benign.customer_suffix("journalide.org") is None


def test_list_types_follow_misp_semantics() -> None:
    lists = [
        WarninglistData("exact", "string", ("exact.example",), ("domain",)),
        WarninglistData("under", "hostname", ("cdn.example",), ("domain", "hostname")),
        WarninglistData("my dynamic DNS list", "hostname", (".dyn.example",), ("domain",)),
        WarninglistData("nets", "cidr", ("192.0.2.0/24", "2001:db8::/32"), ("ip-dst",)),
        WarninglistData("mail", "regex", (r"/^(abuse|noc)\@.*$/i",), ("email-src",)),
    ]
    benign = BenignInfrastructure.from_lists(lists)
    check = benign.is_benign_value
    assert check(IndicatorType.DOMAIN, "exact.example") == "exact"
    assert check(IndicatorType.DOMAIN, "a.exact.example") is None  # string: exact only
    assert check(IndicatorType.DOMAIN, "a.b.cdn.example") == "under"  # hostname: and below
    assert check(IndicatorType.DOMAIN, "dyn.example") == "my dynamic DNS list"
    assert check(IndicatorType.DOMAIN, "x.dyn.example") is None  # dynamic DNS: exact only
    assert check(IndicatorType.IPV4, "192.0.2.77") == "nets"
    assert check(IndicatorType.IPV6, "2001:db8::1") == "nets"
    assert check(IndicatorType.IPV4, "192.0.3.1") is None
    assert check(IndicatorType.EMAIL, "Abuse@corp.example") == "mail"


def test_shared_services_file_parses_and_rejects_bad_lines() -> None:
    services = load_shared_services()
    assert any(s.host == "webhook.site" and s.kind == "service" for s in services)
    assert all(s.reason for s in services)
    with pytest.raises(IntelError):
        load_shared_services("example.com maybe  # unknown kind\n")


def test_lookups_are_fast(benign: BenignInfrastructure) -> None:
    values = [f"10{i % 90}.{i % 250}.{i % 7}.{i % 200}" for i in range(5000)]
    names = [f"host{i}.example{i}.com" for i in range(5000)]
    started = time.perf_counter()
    for address, name in zip(values, names, strict=True):
        benign.is_benign_value(IndicatorType.IPV4, address)
        benign.is_benign_value(IndicatorType.DOMAIN, name)
    per_lookup = (time.perf_counter() - started) / 10_000
    assert per_lookup < 100e-6  # measured ≈ 15 µs; the library's slow search is ~ms per value


def test_compiled_tables_round_trip_through_the_cache(tmp_path: Path) -> None:
    lists = [
        WarninglistData("first", "string", ("dup.example", "one.example"), ("domain",)),
        WarninglistData("second", "string", ("dup.example",), ("domain",)),
        WarninglistData("nets", "cidr", ("198.51.100.0/24", "not-a-network"), ("ip-dst",)),
    ]
    compiled = compile_warninglists(lists)
    save_tables(compiled, tmp_path / "tables", "source-1")
    loaded = load_tables(tmp_path / "tables", "source-1")
    assert loaded is not None
    assert isinstance(loaded.keys, KeyFile)  # read by block, not into the process
    assert load_tables(tmp_path / "tables", "source-2") is None  # other lists: recompile
    benign = BenignInfrastructure(loaded)
    check = benign.is_benign_value
    assert check(IndicatorType.DOMAIN, "dup.example") == "first"  # the first list wins
    assert check(IndicatorType.DOMAIN, "one.example") == "first"
    assert check(IndicatorType.IPV4, "198.51.100.9") == "nets"
    assert check(IndicatorType.DOMAIN, "other.example") is None


def test_damaged_table_cache_raises_a_typed_error(tmp_path: Path) -> None:
    compiled = compile_warninglists(
        [WarninglistData("one", "string", ("a.example", "b.example"), ("domain",))]
    )
    save_tables(compiled, tmp_path / "tables", "source")
    np.save(tmp_path / "tables" / "owners.npy", np.zeros(1, dtype=np.uint16))
    with pytest.raises(IntelError):
        load_tables(tmp_path / "tables", "source")


def test_default_lists_are_compiled_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV_VAR, str(tmp_path))
    first = default_warninglist_tables()
    (cached,) = tmp_path.glob("warninglists-*")
    again = default_warninglist_tables()
    assert isinstance(again.keys, KeyFile)
    assert again.names == first.names and len(again.keys) == len(first.keys)
    assert "List of disposable email domains" not in again.names  # exclusions hold
    assert (cached / "keys.npy").is_file()


def test_saved_tables_answer_like_the_compiled_ones_across_blocks(tmp_path: Path) -> None:
    # Several blocks of WARNINGLIST_BLOCK_KEYS keys, so probes land at block edges too.
    entries = tuple(f"host{i}.example" for i in range(3 * WARNINGLIST_BLOCK_KEYS + 7))
    lists = [
        WarninglistData("first", "string", entries[::2], ("domain",)),
        WarninglistData("second", "string", entries, ("domain",)),
    ]
    compiled = compile_warninglists(lists)
    save_tables(compiled, tmp_path / "tables", "source")
    loaded = load_tables(tmp_path / "tables", "source")
    assert loaded is not None
    probes = [table_key("exact", "domain", e) for e in entries]
    probes += [table_key("exact", "domain", f"absent{i}.example") for i in range(200)]
    probes += [0, 2**64 - 1]  # below the first key and above the last
    assert loaded.find(probes) == compiled.find(probes)
    assert loaded.find(probes)[:4] == ["first", "second", "first", "second"]
    mapped = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert "keys.npy" not in mapped  # read by block: nothing of the table stays mapped


def test_truncated_keys_file_raises_a_typed_error(tmp_path: Path) -> None:
    compiled = compile_warninglists(
        [WarninglistData("one", "string", ("a.example", "b.example"), ("domain",))]
    )
    save_tables(compiled, tmp_path / "tables", "source")
    keys = tmp_path / "tables" / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:-8])
    with pytest.raises(IntelError):
        load_tables(tmp_path / "tables", "source")
