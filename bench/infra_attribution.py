"""Infrastructure attribution benchmark over public reports (protocol: data/intel/README.md).

Each report (an ESET ``==`` section, a maltrail ``# Reference`` block) is a query with a known
actor. Its label is hidden; the knowledge base holds only reports dated strictly earlier that
cite none of the query's reference URLs. Reported per source and overall:

* same-actor link rate: queries linked to their own actor;
* wrong-actor link rate: queries linked to some other actor;
* top-1 correct among linked queries.

"Linked" for earmark means an actor scoring at least ``--min-score`` (noisy-OR of weighted
evidence, ``correlate.infrastructure``); for the naive baseline it means any exact shared value
after dropping MISP-warninglisted values, actors ranked by the count of shared values.

    .venv/bin/python bench/infra_attribution.py [--intel-dir DIR] [--min-score 0.3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from earmark.correlate.infrastructure import InfrastructureIndex, Observation, rank_actors
from earmark.intel.aliases import AliasResolver
from earmark.intel.eset import parse_eset_readme
from earmark.intel.maltrail import parse_aliases, parse_maltrail_file
from earmark.intel.warninglists import (
    BenignInfrastructure,
    default_benign_infrastructure,
    misp_warninglists,
)
from earmark.model.intel import IntelReport

DEFAULT_INTEL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "intel"
# An actor scoring below this is not called a link: one decayed /24 neighbour (0.3 × decay)
# or one value shared by two actors (0.5) is a lead, not attribution.
DEFAULT_MIN_SCORE = 0.3

# ESET folder → the name the alias catalogue knows. Folders not listed resolve by their own
# name (underscores as spaces). Sources: ESET's own blog posts naming the group.
ESET_FOLDER_ACTORS: dict[str, str] = {
    "nukesped_lazarus": "Lazarus Group",
    "sednit": "APT28",
    "dukes": "APT29",
    "turla": "Turla",
    "kimsuky": "Kimsuky",
    "scarcruft": "APT37",
    "oceanlotus": "APT32",
    "winnti_group": "Winnti Group",
    "gamaredon": "Gamaredon Group",
    "telebots": "Sandworm Team",
    "industroyer": "Sandworm Team",
    "greyenergy": "GreyEnergy",
    "okrum_ke3chang": "Ke3chang",
    "mustang_panda": "Mustang Panda",
    "evasive_panda": "Evasive Panda",
    "ballisticbobcat": "Charming Kitten",
    "oilrig": "OilRig",
    "tick": "Tick",
    "donot": "Donot Team",
    "machete": "Machete",
    "polonium": "POLONIUM",
    "stealthfalcon": "Stealth Falcon",
    "mirrorface": "MirrorFace",
    "winter_vivern": "Winter Vivern",
    "moustachedbouncer": "MoustachedBouncer",
    "goldenjackal": "GoldenJackal",
    "backdoordiplomacy": "BackdoorDiplomacy",
    "sparklinggoblin": "SparklingGoblin",
    "famoussparrow": "FamousSparrow",
    "apt_c_60": "APT-C-60",
    "aridspy": "Arid Viper",
}
# Folders that are not one actor (topic collections, several groups, phishing waves).
ESET_NON_ACTOR_FOLDERS = frozenset(
    {
        "quarterly_reports",
        "exchange_exploitation",
        "badiis",
        "pwa_phishing",
        "zimbra_phishing",
        "ua_wipers",
        "ace_cryptor",
        "pypi_backdoor",
        "hotpage",
        "spyloan",
        "ngate",
        "evilvideo",
    }
)
MALTRAIL_NON_ACTOR_FILES = frozenset({"unclassified"})
# maltrail file names the alias catalogue does not know and whose Aliases line names none.
MALTRAIL_FILE_ACTORS: dict[str, str] = {"gamaredon": "Gamaredon Group"}


@dataclass(frozen=True, slots=True)
class Query:
    report: IntelReport
    actor: str
    references: frozenset[str]


@dataclass
class Tally:
    queries: int = 0
    same_actor: int = 0
    wrong_actor: int = 0
    linked: int = 0
    top1_correct: int = 0

    def row(self) -> tuple[str, str, str, str]:
        def rate(part: int, whole: int) -> str:
            return f"{100.0 * part / whole:5.1f} %" if whole else "   n/a"

        return (
            str(self.queries),
            rate(self.same_actor, self.queries),
            rate(self.wrong_actor, self.queries),
            rate(self.top1_correct, self.linked),
        )


def _normalise_reference(url: str) -> str:
    return url.strip().lower().removeprefix("https://").removeprefix("http://").rstrip("/")


def load_queries(intel_dir: Path, resolver: AliasResolver) -> list[Query]:
    def resolve(name: str) -> str:
        return resolver.resolve(name)

    queries: list[Query] = []
    maltrail_dir = intel_dir / "maltrail" / "trails" / "static" / "malware"
    for path in sorted(maltrail_dir.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        stem = path.stem.removeprefix("apt_").split("-")[0]
        if stem in MALTRAIL_NON_ACTOR_FILES:
            continue
        candidates = [MALTRAIL_FILE_ACTORS.get(stem, stem), *parse_aliases(text)]
        known = next((name for name in candidates if resolver.is_known(name)), candidates[0])
        actor = resolve(known)
        for block in parse_maltrail_file(path, lambda _name, actor=actor: actor):
            refs = frozenset(_normalise_reference(r) for r in block.references)
            queries.append(Query(block.report, actor, refs))

    def eset_actor(folder: str) -> str:
        return resolve(ESET_FOLDER_ACTORS.get(folder, folder.replace("_", " ")))

    eset_dir = intel_dir / "eset_malware-ioc"
    for readme in sorted(eset_dir.glob("*/**/README.adoc")):
        folder = readme.parent.relative_to(eset_dir).as_posix()
        if folder.split("/")[0] in ESET_NON_ACTOR_FOLDERS:
            continue
        text = readme.read_text(encoding="utf-8", errors="replace")
        for report in parse_eset_readme(text, folder, resolve_actor=eset_actor):
            queries.append(_eset_query(report))
    return queries


def _eset_query(report: IntelReport) -> Query:
    refs = frozenset({_normalise_reference(report.reference)} if report.reference else ())
    return Query(report, report.actors[0], refs)


def _eligible(query: Query, info: dict[str, Query]) -> Callable[[Observation], bool]:
    assert query.report.published is not None
    cutoff = query.report.published

    def eligible(observation: Observation) -> bool:
        other = info[observation.report_id]
        published = other.report.published
        return (
            published is not None
            and published < cutoff
            and not (other.references & query.references)
        )

    return eligible


def baseline_scores(
    query: Query,
    exact: dict[tuple[str, str], list[str]],
    info: dict[str, Query],
    benign: BenignInfrastructure,
) -> Counter[str]:
    """Naive exact overlap: count of shared non-warninglisted values per actor."""
    eligible = _eligible(query, info)
    counts: Counter[str] = Counter()
    for indicator in set(query.report.indicators):
        if benign.is_benign(indicator):
            continue
        actors = set()
        for report_id in exact.get((indicator.type.value, indicator.value), ()):
            other = info[report_id]
            if eligible(Observation(indicator, report_id, "", other.actor, None, None)):
                actors.add(other.actor)
        counts.update(actors)
    return counts


def _score(tally: Tally, truth: str, linked_actors: dict[str, float]) -> None:
    tally.queries += 1
    if not linked_actors:
        return
    tally.linked += 1
    tally.same_actor += truth in linked_actors
    tally.wrong_actor += any(actor != truth for actor in linked_actors)
    top = max(linked_actors.items(), key=lambda item: (item[1], item[0] == truth))
    tally.top1_correct += top[0] == truth


def run(intel_dir: Path, min_score: float) -> dict[str, dict[str, Tally]]:
    resolver = AliasResolver.default()
    queries = load_queries(intel_dir, resolver)
    info = {q.report.report_id: q for q in queries}
    index = InfrastructureIndex.from_reports(
        (q.report for q in queries), default_benign_infrastructure()
    )
    misp_only = BenignInfrastructure.from_lists(misp_warninglists())
    exact: dict[tuple[str, str], list[str]] = defaultdict(list)
    for q in queries:
        for indicator in set(q.report.indicators):
            exact[(indicator.type.value, indicator.value)].append(q.report.report_id)

    results: dict[str, dict[str, Tally]] = defaultdict(lambda: defaultdict(Tally))
    for query in queries:
        if query.report.published is None:
            continue  # cannot place an undated report in time
        source = query.report.source
        evidence = index.correlate(
            query.report.indicators, at=query.report.published, eligible=_eligible(query, info)
        )
        ours = {s.actor: s.score for s in rank_actors(evidence) if s.score >= min_score}
        naive = baseline_scores(query, exact, info, misp_only)
        for scope in (source, "overall"):
            _score(results["earmark"][scope], query.actor, ours)
            _score(results["baseline"][scope], query.actor, {a: float(c) for a, c in naive.items()})
    return results


def render(results: dict[str, dict[str, Tally]]) -> str:
    lines = [
        "| method | source | queries | same-actor link | wrong-actor link | top-1 of linked |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method in ("baseline", "earmark"):
        for scope in sorted(results[method], key=lambda s: (s == "overall", s)):
            cells = " | ".join(results[method][scope].row())
            lines.append(f"| {method} | {scope} | {cells} |")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--intel-dir", type=Path, default=DEFAULT_INTEL_DIR)
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE)
    args = parser.parse_args(list(argv) if argv is not None else None)
    started = time.perf_counter()
    results = run(args.intel_dir, args.min_score)
    print(render(results))
    print(f"\n({time.perf_counter() - started:.0f} s, run on {date.today().isoformat()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
