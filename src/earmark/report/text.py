"""Plain-text rendering of a case and of a comparison (no terminal library: the CLI prints it).

Every string that could come from a sample or a label is passed through ``printable`` so that
control characters cannot move the cursor or recolour a terminal.
"""

from __future__ import annotations

from typing import Final

from earmark.report.document import CaseReport, CompareReport, EvidenceItem

# Evidence lines shown in the text case; the JSON document has every item.
TEXT_EVIDENCE_SHOWN: Final = 15
# Shared functions shown side by side in `compare`, and instructions per function.
TEXT_SHARED_SHOWN: Final = 10
TEXT_INSTRUCTIONS_SHOWN: Final = 40
# Width of one disassembly column in the side-by-side view.
COLUMN_WIDTH: Final = 38


def printable(text: str | None) -> str:
    """``text`` with control characters replaced, safe for a terminal."""
    if text is None:
        return "-"
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _address(value: int | None) -> str:
    return "-" if value is None else f"0x{value:x}"


def describe_evidence(item: EvidenceItem) -> str:
    """One line per evidence item, rendered from its fields."""
    owner = printable(item.actor or "no actor") + " / " + printable(item.family or "no family")
    if item.kind == "code":
        where = (
            f"{_address(item.query_address)} ({item.query_size or 0} B) = "
            f"{(item.match_sha256 or '-')[:12]}…:{_address(item.match_address)}"
        )
    elif item.kind == "artefact":
        place = "" if item.query_offset is None else f" @file+0x{item.query_offset:x}"
        if item.query_address is not None:
            place += f" @{_address(item.query_address)}"
        where = f"{printable(item.pivot)} {printable(repr(item.value))}{place}"
        if item.match_sha256:
            where += f" = {item.match_sha256[:12]}…"
    else:
        where = f"{printable(item.pivot)} {printable(item.value)} ~ {printable(item.matched_value)}"
        if item.report_id:
            where += f" [{printable(item.report_id)}]"
    return (
        f"[{item.kind}] {where}  sim {item.similarity:.2f} x weight {item.weight:.2f} = "
        f"{item.contribution:.2f}  -> {owner}: {printable(item.reason)}"
    )


def render_case_text(case: CaseReport) -> str:
    query = case.query
    lines = [
        f"case: {printable(query.name)}",
        f"sha256: {case.sha256 or '- (indicators only)'}",
    ]
    if query.function_count:
        lines.append(
            f"functions: {query.function_count} recovered, {query.looked_up_functions} looked up, "
            f"{query.library_functions} library/common, {query.distinctive_functions} distinctive"
        )
    if query.indicator_count:
        lines.append(f"indicators: {query.indicator_count}")
    kb = case.knowledge_base
    lines.append(
        f"knowledge base: {kb.samples} samples, {kb.functions} functions "
        f"({kb.indexed_functions} indexed), revision {kb.revision}"
    )
    lines += ["", f"verdict: {printable(case.verdict.summary)}", "", "hypotheses:"]
    if not case.hypotheses:
        lines.append("  none: nothing rare is shared with the knowledge base")
    for rank, hypothesis in enumerate(case.hypotheses, start=1):
        name = printable(hypothesis.actor or "unknown actor")
        if hypothesis.family:
            name += f" / family {printable(hypothesis.family)}"
        coverage = "" if hypothesis.coverage is None else f", covers {hypothesis.coverage:.0%}"
        lines.append(
            f"  {rank}. {name}: score {hypothesis.score:.2f} ({hypothesis.likelihood}), "
            f"link {hypothesis.link_score:.2f}, "
            f"{hypothesis.relation}, {hypothesis.evidence_count} evidence, "
            f"{hypothesis.rare_function_count} rare functions, {hypothesis.shared_bytes} bytes"
            f"{coverage}"
            + (
                f", {hypothesis.artefact_count} rare artefacts "
                f"(link {hypothesis.artefact_link:.2f})"
                if hypothesis.artefact_count
                else ""
            )
        )
        for position in hypothesis.strongest_evidence:
            lines.append("       " + describe_evidence(case.evidence[position]))
    lines += ["", f"evidence ({len(case.evidence)} items, strongest first):"]
    for item in case.evidence[:TEXT_EVIDENCE_SHOWN]:
        lines.append("  " + describe_evidence(item))
    if len(case.evidence) > TEXT_EVIDENCE_SHOWN:
        lines.append(f"  … {len(case.evidence) - TEXT_EVIDENCE_SHOWN} more in --format json")
    lines += [f"warning: {printable(warning)}" for warning in case.warnings]
    return "\n".join(lines)


def render_compare_text(report: CompareReport) -> str:
    lines = [
        f"A: {report.sha256_a}",
        f"B: {report.sha256_b}",
        f"shared functions: {len(report.shared)} (one-to-one; by similarity, then call graph)",
    ]
    for pair in report.shared[:TEXT_SHARED_SHOWN]:
        lines += [
            "",
            f"A {_address(pair.address_a)} ({pair.size_a} B)  <->  B {_address(pair.address_b)} "
            f"({pair.size_b} B)  similarity {pair.similarity:.2f}  [{pair.matched_by}]",
        ]
        left, right = pair.disassembly_a, pair.disassembly_b
        for row in range(min(max(len(left), len(right)), TEXT_INSTRUCTIONS_SHOWN)):
            a = printable(left[row]) if row < len(left) else ""
            b = printable(right[row]) if row < len(right) else ""
            marker = " " if a == b else "|"
            lines.append(f"  {a[:COLUMN_WIDTH]:<{COLUMN_WIDTH}} {marker} {b[:COLUMN_WIDTH]}")
        if max(len(left), len(right)) > TEXT_INSTRUCTIONS_SHOWN:
            lines.append("  …")
    if len(report.shared) > TEXT_SHARED_SHOWN:
        hidden = len(report.shared) - TEXT_SHARED_SHOWN
        lines.append(f"\n… {hidden} more shared functions in --json")
    return "\n".join(lines)
