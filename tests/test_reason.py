"""Fusion of evidence into hypotheses: de-duplication, caps, dependence, order, verdict."""

from __future__ import annotations

from random import Random

from hypothesis import given
from hypothesis import strategies as st

from earmark.model.evidence import Evidence
from earmark.reason.hypotheses import (
    ARTEFACT_SHARE,
    AUTHORSHIP_COVERAGE,
    DEPENDENT_DISCOUNT,
    KNOWN_ACTOR_THRESHOLD,
    MAX_ARTEFACT_CONTRIBUTION,
    MAX_ARTEFACT_SCORE,
    MAX_ITEM_CONTRIBUTION,
    SHARED_LIBRARY_CAP,
    Hypothesis,
    decide_verdict,
    likelihood_words,
    rank_hypotheses,
)


def code(address: int, actor: str | None = "Group A", family: str | None = "alpha",
         similarity: float = 1.0, weight: float = 1.0, match: str = "a" * 64) -> Evidence:
    return Evidence(kind="code", actor=actor, family=family, similarity=similarity,
                    weight=weight, reason="test", query_address=address, query_size=100,
                    match_sha256=match, match_address=address + 0x1000)


def infrastructure(value: str, actor: str = "Group A") -> Evidence:
    return Evidence(kind="infrastructure", actor=actor, family=None, similarity=1.0,
                    weight=0.5, reason="test", pivot="domain", value=value, matched_value=value)


def actor_score(hypotheses: list[Hypothesis], actor: str) -> float:
    return next(h.score for h in hypotheses if h.actor == actor and h.family is None)


def test_one_function_cannot_make_certainty() -> None:
    hypotheses = rank_hypotheses([code(0x10)])
    assert actor_score(hypotheses, "Group A") == MAX_ITEM_CONTRIBUTION


def test_several_kb_samples_matching_one_function_count_once() -> None:
    once = rank_hypotheses([code(0x10)])
    many = rank_hypotheses([code(0x10, match=c * 64) for c in "abcde"])
    assert actor_score(many, "Group A") == actor_score(once, "Group A")
    assert many[0].evidence_count == 1


def test_independent_functions_combine_as_noisy_or() -> None:
    hypotheses = rank_hypotheses([code(0x10), code(0x20, weight=0.5)])
    expected = 1 - (1 - MAX_ITEM_CONTRIBUTION) * (1 - 0.5)
    assert abs(actor_score(hypotheses, "Group A") - expected) < 1e-4


def test_call_graph_neighbours_are_partly_dependent() -> None:
    evidence = [code(0x10), code(0x20)]
    neighbours = {("code", "10"): {("code", "20")}, ("code", "20"): {("code", "10")}}
    dependent = rank_hypotheses(evidence, neighbours)
    expected = 1 - (1 - MAX_ITEM_CONTRIBUTION) * (1 - MAX_ITEM_CONTRIBUTION * DEPENDENT_DISCOUNT)
    assert abs(actor_score(dependent, "Group A") - expected) < 1e-4
    assert actor_score(dependent, "Group A") < actor_score(rank_hypotheses(evidence), "Group A")


def test_link_score_ignores_query_size_and_score_follows_the_share_explained() -> None:
    evidence = [code(0x10), code(0x20)]
    small = rank_hypotheses(evidence, distinctive_code_units=3)
    large = rank_hypotheses(evidence, distinctive_code_units=300)
    link = 1 - (1 - MAX_ITEM_CONTRIBUTION) ** 2
    assert small[0].link_score == large[0].link_score == round(link, 4)
    # 2 of 3 distinctive functions explained: the link is authorship, the score the link.
    assert small[0].relation == "authored" and small[0].score == round(link, 4)
    # 2 of 300 explained (a library that shares a few routines): a link, and a low score.
    assert large[0].relation == "shares-code"
    assert large[0].score == round(link * (2 / 300) / AUTHORSHIP_COVERAGE, 4)
    # The same two functions in a 4-function query: scaled by the share, authorship kept.
    half = rank_hypotheses(evidence, distinctive_code_units=4)[0]
    assert half.relation == "authored" and half.score == round(link, 4)


def test_a_single_rare_function_is_never_authorship() -> None:
    hypotheses = rank_hypotheses([code(0x10)], distinctive_code_units=1)
    assert hypotheses[0].coverage == 1.0 and hypotheses[0].relation == "shares-code"


def test_code_and_infrastructure_fuse_and_keep_their_kind() -> None:
    evidence = [code(0x10), infrastructure("evil.example"), infrastructure("evil.example")]
    hypotheses = rank_hypotheses(evidence)
    expected = 1 - (1 - MAX_ITEM_CONTRIBUTION) * (1 - 0.5)
    assert abs(actor_score(hypotheses, "Group A") - expected) < 1e-4
    assert next(h for h in hypotheses if h.family is None).evidence_count == 2


def test_family_and_actor_hypotheses() -> None:
    hypotheses = rank_hypotheses([code(0x10), code(0x20, actor=None, family="orphan")])
    keys = {(h.actor, h.family) for h in hypotheses}
    assert keys == {("Group A", None), ("Group A", "alpha"), (None, "orphan")}


def test_verdict_threshold_and_no_known_actor() -> None:
    weak = rank_hypotheses([code(0x10, similarity=0.6, weight=0.5)])
    assert weak[0].score < KNOWN_ACTOR_THRESHOLD
    assert decide_verdict(weak).actor is None
    assert decide_verdict([]).summary == "no known actor"
    strong = rank_hypotheses([code(a) for a in (0x10, 0x20, 0x30)], distinctive_code_units=4)
    verdict = decide_verdict(strong)
    assert (verdict.actor, verdict.family) == ("Group A", "alpha")
    linked = rank_hypotheses([code(a) for a in (0x10, 0x20, 0x30)], distinctive_code_units=30)
    verdict = decide_verdict(linked)
    assert verdict.actor is None and "Group A" in verdict.summary


def test_likelihood_words_follow_icd_203() -> None:
    assert likelihood_words(0.0) == "almost no chance"
    assert likelihood_words(0.5) == "roughly even chance"
    assert likelihood_words(0.99) == "almost certain"


@given(st.permutations(list(range(6))))
def test_ranking_does_not_depend_on_evidence_order(order: list[int]) -> None:
    evidence = [
        code(0x10), code(0x20, weight=0.3), code(0x30, actor="Group B", family="bravo"),
        code(0x10, actor="Group B", family="bravo", similarity=0.7),
        infrastructure("a.example"), infrastructure("b.example", actor="Group B"),
    ]
    baseline = rank_hypotheses(evidence)
    shuffled = rank_hypotheses([evidence[i] for i in order])
    assert [(h.actor, h.family, h.score, h.evidence_count) for h in shuffled] == [
        (h.actor, h.family, h.score, h.evidence_count) for h in baseline
    ]


def artefact(value: str, pivot: str = "string", actor: str = "Group A", family: str = "alpha",
             weight: float = 1.0, share: float | None = 1.0,
             referenced_by: tuple[int, ...] = ()) -> Evidence:
    return Evidence(kind="artefact", actor=actor, family=family, similarity=1.0, weight=weight,
                    reason="test", match_sha256="b" * 64, pivot=pivot, value=value,
                    matched_value=value, related_addresses=referenced_by,
                    match_share=share if pivot == "string" else None)


def shared_library() -> Evidence:
    return Evidence(kind="artefact", actor=None, family=None, similarity=1.0, weight=0.0,
                    reason="shared library used by 5 groups", pivot="shared-library",
                    value="libcrc.dll", matched_value="libcrc.dll")


def test_artefacts_alone_are_a_lead_capped_below_code_certainty() -> None:
    evidence = [artefact(f"string {n}") for n in range(20)] + [artefact("Init", "export")]
    hypotheses = rank_hypotheses(evidence)
    best = next(h for h in hypotheses if h.family is None)
    assert best.relation == "shares-artefacts"
    assert best.score == MAX_ARTEFACT_SCORE
    assert best.artefact_count == 21 and best.artefact_link > 0.99
    verdict = decide_verdict(hypotheses)
    assert verdict.actor is None and "Group A by rare artefacts" in verdict.summary


def test_one_artefact_contributes_at_most_its_cap() -> None:
    hypotheses = rank_hypotheses([artefact("Global\\mutex-7f3a")])
    assert actor_score(hypotheses, "Group A") == MAX_ARTEFACT_CONTRIBUTION


def test_a_string_a_counted_shared_function_references_is_not_counted_again() -> None:
    with_string = rank_hypotheses([code(0x10), artefact("beacon %s", referenced_by=(0x10,))])
    alone = rank_hypotheses([code(0x10)])
    assert actor_score(with_string, "Group A") == actor_score(alone, "Group A")
    # Referenced by a function the code evidence did not count: independent, it adds.
    other = rank_hypotheses([code(0x10), artefact("beacon %s", referenced_by=(0x20,))])
    assert actor_score(other, "Group A") > actor_score(alone, "Group A")


def test_strings_count_by_the_share_of_a_known_sample_they_cover() -> None:
    strings = [artefact(f"string {n}", share=ARTEFACT_SHARE / 4) for n in range(10)]
    partial = actor_score(rank_hypotheses(strings), "Group A")
    link = 1 - (1 - MAX_ARTEFACT_CONTRIBUTION) ** 10
    assert abs(partial - link / 4) < 1e-3  # the string link scaled by share / ARTEFACT_SHARE
    # Identity artefacts (exports, PDB path, ...) are not scaled by the share.
    export = actor_score(rank_hypotheses([artefact("PyInit_x", "export")]), "Group A")
    assert export == MAX_ARTEFACT_CONTRIBUTION


def test_artefacts_add_to_code_without_reaching_past_one() -> None:
    evidence = [code(a) for a in (0x10, 0x20, 0x30)] + [artefact(f"s{n}") for n in range(5)]
    hypotheses = rank_hypotheses(evidence, distinctive_code_units=4)
    best = next(h for h in hypotheses if h.family is None)
    code_only = next(h for h in rank_hypotheses(evidence[:3], distinctive_code_units=4)
                     if h.family is None)
    assert code_only.score < best.score <= 1.0
    assert best.relation == "authored" and best.artefact_count == 5


def test_shared_library_caps_every_hypothesis_and_says_why() -> None:
    evidence = [code(a) for a in (0x10, 0x20, 0x30)] + [shared_library()]
    hypotheses = rank_hypotheses(evidence, distinctive_code_units=3)
    assert all(h.score <= SHARED_LIBRARY_CAP for h in hypotheses)
    assert all(h.relation == "shared-library" for h in hypotheses)
    verdict = decide_verdict(hypotheses, shared_library())
    assert verdict.actor is None
    assert "shared library used by 5 groups" in verdict.summary


def test_build_environment_alone_makes_no_link() -> None:
    toolchain = [artefact("1.0;147.30729;257.33811", "rich-header"), artefact("ab12", "imphash")]
    assert rank_hypotheses(toolchain) == []
    # With other evidence it corroborates.
    with_export = rank_hypotheses([*toolchain, artefact("PyInit_x", "export")])
    alone = rank_hypotheses([artefact("PyInit_x", "export")])
    assert actor_score(with_export, "Group A") > actor_score(alone, "Group A")


_ITEMS = st.one_of(
    st.builds(code, st.sampled_from([0x10, 0x20, 0x30]), st.sampled_from(["Group A", "Group B"]),
              st.sampled_from(["alpha", "bravo"]), st.floats(0, 1), st.floats(0, 1)),
    st.builds(artefact, st.sampled_from(["s1", "s2", "s3"]),
              st.sampled_from(["string", "export", "imphash", "rich-header"]),
              st.sampled_from(["Group A", "Group B"]), st.sampled_from(["alpha", "bravo"]),
              st.floats(0, 1), st.floats(0, 1),
              st.sampled_from([(), (0x10,), (0x20, 0x30)])),
)


@given(st.lists(_ITEMS, max_size=12), st.booleans(), st.randoms(use_true_random=False))
def test_mixed_evidence_scores_stay_in_range_and_ignore_order(
    items: list[Evidence], shared: bool, random: Random
) -> None:
    evidence = [*items, *([shared_library()] if shared else [])]
    shuffled = list(evidence)
    random.shuffle(shuffled)
    baseline = rank_hypotheses(evidence, distinctive_code_units=5)
    assert all(0.0 <= h.score <= 1.0 and 0.0 <= h.link_score <= 1.0 for h in baseline)
    assert all(h.score <= SHARED_LIBRARY_CAP for h in baseline) or not shared
    again = rank_hypotheses(shuffled, distinctive_code_units=5)
    assert [(h.actor, h.family, h.score, h.relation) for h in again] == [
        (h.actor, h.family, h.score, h.relation) for h in baseline
    ]
