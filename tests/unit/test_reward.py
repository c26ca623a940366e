"""Tag parsing and the paper's reward (Eq. 2) on hand-written responses, including the awkward ones.

The actors.tags parsers are the strict grammar ("research-strict"); the default reward follows the reference
(actors.research_grammar), whose verdict on each format below is asserted beside the strict one.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import research_grammar
from actors.reward import (
    FORMAT_REWARD,
    compute_score,
    score_details,
    strict_compute_score,
    strict_score_details,
)
from actors.tags import (
    ALL_TAGS,
    extract_answer,
    extract_boxed,
    extract_search_query,
    is_valid_format,
    strip_results,
)

GOLDEN = ["Andrés Manuel López Obrador", "AMLO"]

SEARCH_TURN = (
    "<think> I need the party first. </think>\n<search> Martín Ramírez Pech party </search>"
    "<result>\n\"Labor Party (Mexico)\"\nThe Labor Party ...\n</result>\n"
)
CORRECT = (
    SEARCH_TURN
    + "<think> Now the 2018 winner. </think>\n"
    "<answer> The final answer is \\[ \\boxed{Andrés Manuel López Obrador} \\] </answer>"
)


def answer_block(boxed: str) -> str:
    return f"<answer> The final answer is \\[ \\boxed{{{boxed}}} \\] </answer>"


# --- extract_search_query ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("<think> hm </think> <search> capital of France </search>", "capital of France"),
        ("<search>a</search><result>x</result><think>t</think><search> second query </search>", "second query"),
        ("<think>t</think><search></search>", ""),
        ("<think>t</think><search>   \n </search>", ""),
        ("<search> query </search>\n  ", "query"),  # trailing whitespace after the stop string
        ("<search> Zürich 東京 café </search>", "Zürich 東京 café"),
        ("<think> no search here </think>", None),
        ("<search> never closed", None),
        ("query without opening </search>", None),
        ("<search> a </search> then text", None),  # does not END with a search call
        # The nearest <search> is inside a result block: the final </search> opens no call of its own.
        ("<search>q</search><result> see <search> </result> oops </search>", None),
        ("", None),
    ],
)
def test_extract_search_query(text: str, query: str | None) -> None:
    assert extract_search_query(text) == query


# --- extract_boxed ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("\\boxed{Paris}", "Paris"),
        ("\\boxed{\\text{Paris}}", "\\text{Paris}"),
        ("x \\boxed{a{b{c}}d} y", "a{b{c}}d"),
        ("\\boxed{first} and \\boxed{second}", "second"),
        ("\\boxed{}", ""),
        ("\\boxed {spaced}", "spaced"),
        ("\\boxed{a \\} b}", "a \\} b"),  # an escaped brace is content
        ("\\boxed{unbalanced {", None),
        ("\\boxed{never closed", None),
        ("no box here {}", None),
        ("\\boxed{ok} \\boxed{broken", None),  # the last box decides
    ],
)
def test_extract_boxed(text: str, content: str | None) -> None:
    assert extract_boxed(text) == content


# --- extract_answer ---------------------------------------------------------------------------------------------

def test_extract_answer_reads_the_single_answer_block() -> None:
    assert extract_answer(CORRECT) == "Andrés Manuel López Obrador"


def test_extract_answer_unwraps_text_commands() -> None:
    assert extract_answer("<think>t</think>" + answer_block("\\text{Paris}")) == "Paris"
    assert extract_answer("<think>t</think>" + answer_block("\\textbf{\\text{New York}}")) == "New York"


def test_extract_answer_none_when_ambiguous_or_missing() -> None:
    two = "<think>t</think>" + answer_block("A") + answer_block("B")
    assert extract_answer(two) is None
    assert extract_answer("<think>t</think><answer> Paris </answer>") is None
    assert extract_answer("<think>t</think><answer> \\boxed{Paris}") is None
    assert extract_answer("\\boxed{Paris}") is None


def test_extract_answer_ignores_answers_quoted_in_results() -> None:
    response = (
        "<think>t</think><search>q</search><result> a page quoting <answer> \\boxed{Wrong} </answer> </result>"
        "<think>u</think>" + answer_block("Right")
    )
    assert extract_answer(response) == "Right"
    assert "Wrong" not in strip_results(response)


# --- is_valid_format --------------------------------------------------------------------------------------------

VALID = {
    "one search": CORRECT,
    "no search": "<think> I know this. </think> " + answer_block("Paris"),
    "empty think": "<think></think>" + answer_block("Paris"),
    "empty boxed": "<think>t</think>" + answer_block(""),
    "nested braces": "<think>t</think>" + answer_block("\\text{Paris}"),
    "search inside think": (
        "<think> let me look <search> q </search><result>\np\n</result> ok </think>" + answer_block("Paris")
    ),
    "empty query": "<think>t</think><search></search><result>\n\n</result><think>u</think>" + answer_block("X"),
    "text around tags": "Sure. <think>t</think> So: " + answer_block("Paris") + " Hope this helps.",
    "tags quoted in result": (
        "<think>t</think><search>q</search><result> <think> <answer> \\boxed{x} </answer> <search> </result>"
        "<think>u</think>" + answer_block("Paris")
    ),
    "unicode": "<think> 東京は日本の首都 </think>" + answer_block("東京"),
    "two searches": (
        "<think>a</think><search>q1</search><result>r1</result>"
        "<think>b</think><search>q2</search><result>r2</result><think>c</think>" + answer_block("Y")
    ),
}

INVALID = {
    "no think": answer_block("Paris"),
    "unclosed think": "<think> t " + answer_block("Paris"),
    "answer inside think": "<think> t " + answer_block("Paris") + "</think>",
    "nested think": "<think><think>t</think></think>" + answer_block("Paris"),
    "close before open": "</think><think>" + answer_block("Paris"),
    "two answers": "<think>t</think>" + answer_block("A") + answer_block("B"),
    "no answer": "<think>t</think> The final answer is \\boxed{Paris}",
    "missing boxed": "<think>t</think><answer> Paris </answer>",
    "unbalanced boxed": "<think>t</think><answer> \\boxed{Paris </answer>",
    "unclosed answer": "<think>t</think><answer> \\boxed{Paris}",
    "search after answer": "<think>t</think>" + answer_block("Paris") + "<search> more </search><result>r</result>",
    "think after answer": "<think>t</think>" + answer_block("Paris") + "<think> second thoughts </think>",
    "search without result": "<think>t</think><search> q </search>" + answer_block("Paris"),
    "unclosed search": "<think>t</think><search> q " + answer_block("Paris"),
    "stray search close": "<think>t</think> q </search><result>r</result>" + answer_block("Paris"),
    "hallucinated result": "<think>t</think><result> made up </result>" + answer_block("Paris"),
    "stray result close": "<think>t</think> text </result>" + answer_block("Paris"),
    "unclosed result": "<think>t</think><search>q</search><result> p " + answer_block("Paris"),
    "tag inside answer": "<think>t</think><answer><think>x</think> \\boxed{Paris} </answer>",
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_formats(name: str) -> None:
    assert is_valid_format(VALID[name], finished=True)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_formats(name: str) -> None:
    assert not is_valid_format(INVALID[name], finished=True)


# The reference counts tags instead of reading their order, and counts them inside passages too: of the formats
# above, these are the ones where its verdict differs from the strict grammar's.
REFERENCE_REJECTS_STRICT_VALID = {"tags quoted in result"}
REFERENCE_ACCEPTS_STRICT_INVALID = {
    "answer inside think",
    "nested think",
    "close before open",
    "search after answer",
    "think after answer",
    "stray search close",
    "hallucinated result",
    "stray result close",
    "tag inside answer",
}


@pytest.mark.parametrize("name", sorted(VALID) + sorted(INVALID))
def test_reference_format_verdicts(name: str) -> None:
    response = VALID.get(name, INVALID.get(name, ""))
    accepted = research_grammar.format_problem(response) is None
    expected = (name in VALID) != (name in REFERENCE_REJECTS_STRICT_VALID | REFERENCE_ACCEPTS_STRICT_INVALID)
    assert accepted == expected


def test_truncated_response_is_invalid() -> None:
    assert is_valid_format(CORRECT, finished=True)
    assert not is_valid_format(CORRECT, finished=False)


# --- compute_score / score_details ------------------------------------------------------------------------------

def test_correct_answer_scores_its_f1() -> None:
    assert compute_score(CORRECT, GOLDEN) == pytest.approx(1.0)
    assert compute_score(CORRECT, "Andrés Manuel López Obrador") == pytest.approx(1.0)


def test_partial_answer_scores_partial_f1() -> None:
    response = "<think>t</think>" + answer_block("López Obrador")
    # 2 shared tokens: precision 1, recall 2/4 -> F1 2/3.
    assert compute_score(response, GOLDEN) == pytest.approx(2 / 3)


def test_wrong_answer_with_valid_format_scores_format_reward() -> None:
    response = "<think>t</think>" + answer_block("Felipe Calderón")
    assert compute_score(response, GOLDEN) == FORMAT_REWARD == 0.1
    assert compute_score("<think>t</think>" + answer_block(""), GOLDEN) == FORMAT_REWARD


def test_invalid_format_scores_zero_even_when_right() -> None:
    assert compute_score(CORRECT, GOLDEN, finished=False) == 0.0
    two = "<think>t</think>" + answer_block("AMLO") + answer_block("AMLO")
    assert compute_score(two, GOLDEN) == 0.0
    assert compute_score("<think>t</think><answer> AMLO </answer>", GOLDEN) == 0.0


def test_text_wrapped_answer_scores_like_plain_text_only_when_strict() -> None:
    response = "<think>t</think>" + answer_block("\\text{AMLO}")
    assert strict_compute_score(response, GOLDEN) == pytest.approx(1.0)
    # The reference keeps the wrapper: "\\text{AMLO}" normalises to "textamlo", which shares no token with "amlo".
    assert compute_score(response, GOLDEN) == FORMAT_REWARD
    assert score_details(response, GOLDEN)["answer"] == "\\text{AMLO}"


def test_yes_no_answers_match_exactly() -> None:
    assert compute_score("<think>t</think>" + answer_block("no"), ["yes"]) == FORMAT_REWARD
    assert compute_score("<think>t</think>" + answer_block("Yes."), ["yes"]) == pytest.approx(1.0)


def test_empty_golden_answers_give_format_reward_only() -> None:
    assert compute_score(CORRECT, []) == FORMAT_REWARD


def test_score_details_reports_answer_metrics_even_for_invalid_format() -> None:
    details = score_details(CORRECT, GOLDEN, finished=False)
    assert details == {
        "format_valid": False,
        "answer": "Andrés Manuel López Obrador",
        "f1": pytest.approx(1.0),
        "em": 1.0,
        "reward": 0.0,
    }
    valid = score_details("<think>t</think>" + answer_block("López Obrador"), GOLDEN)
    assert valid["format_valid"] and valid["em"] == 0.0 and valid["reward"] == pytest.approx(2 / 3)
    missing = score_details("no tags at all", GOLDEN)
    assert missing == {"format_valid": False, "answer": None, "f1": 0.0, "em": 0.0, "reward": 0.0}


# --- never raises, stays in [0, 1] ------------------------------------------------------------------------------

_PIECES = st.one_of(
    st.sampled_from(ALL_TAGS + ("\\boxed{", "\\boxed {", "{", "}", "\\", "\\text{", " ", "\n", "AMLO", "yes")),
    st.text(max_size=12),
)
_RESPONSES = st.lists(_PIECES, max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(response=_RESPONSES, golden=st.lists(st.text(max_size=10), max_size=3), finished=st.booleans())
def test_compute_score_never_raises_and_stays_in_unit_interval(
    response: str, golden: list[str], finished: bool
) -> None:
    for scorer, details_of in ((compute_score, score_details), (strict_compute_score, strict_score_details)):
        reward = scorer(response, golden, finished)
        assert 0.0 <= reward <= 1.0
        details = details_of(response, golden, finished)
        assert details["reward"] == reward
        if not details["format_valid"]:
            assert reward == 0.0
        else:
            assert reward >= FORMAT_REWARD
    extract_search_query(response)
    strip_results(response)


_PLAIN = st.text(alphabet=st.characters(blacklist_characters="<\\{}"), max_size=15)
_PASSAGES = st.lists(
    st.one_of(_PLAIN, st.sampled_from([t for t in ALL_TAGS if t != "</result>"] + ["\\boxed{x}"])), max_size=6
).map("".join)


@st.composite
def _well_formed_trajectories(draw: st.DrawFn) -> tuple[str, dict[int, str], str]:
    """A response the rollout could produce, its search queries (by where each call ends) and its answer."""
    response = draw(_PLAIN) + f"<think>{draw(_PLAIN)}</think>"
    queries = {}
    for _ in range(draw(st.integers(0, 3))):
        query = draw(_PLAIN)
        response += f"{draw(_PLAIN)}<search>{query}</search>"
        queries[len(response)] = query
        response += f"<result>\n{draw(_PASSAGES)}\n</result><think>{draw(_PLAIN)}</think>"
    answer = draw(_PLAIN)
    response += f"<answer> The final answer is \\[ \\boxed{{{answer}}} \\] </answer>{draw(_PLAIN)}"
    return response, queries, answer


@settings(max_examples=200, deadline=None)
@given(trajectory=_well_formed_trajectories())
def test_well_formed_trajectories_parse_back(trajectory: tuple[str, dict[int, str], str]) -> None:
    response, queries, answer = trajectory
    assert is_valid_format(response, finished=True)
    assert extract_answer(response) == answer.strip()
    for end, query in queries.items():
        assert extract_search_query(response[:end]) == query.strip()
    # Passages here may quote tags, which the reference counts: only the strict grammar must accept them all.
    assert strict_compute_score(response, [answer]) >= FORMAT_REWARD


def test_toy_reward_counts_only_policy_tokens() -> None:
    from actors.reward import toy_low_token_ids_reward

    assert toy_low_token_ids_reward([1, 900, 2, 700], [1, 1, 0, 0]) == 0.5  # inserted tokens (mask 0) do not count
    assert toy_low_token_ids_reward([5, 6], [0, 0]) == 0.0
    assert toy_low_token_ids_reward([], []) == 0.0
