"""The ReSearch tag vocabulary and pure parsers over response text: search calls, the boxed answer, the format rule.

A response interleaves policy text with environment text. The rollout stops generation at `</search>` and appends
`<result>\\n{passages}\\n</result>`; everything inside such a result block is retrieved Wikipedia text, so the
parsers here never read tags inside it: a passage quoting "<answer>" or "\\boxed{x}" can neither add an answer nor
break the think/answer counts. A result block ends at the first `</result>` after its `<result>`, so a passage
holding that literal string would end its block early: the search loop must keep it out of the passages it inserts
(plain Wikipedia text does not contain it).

Format rule of the `research-strict` reward (paper Eq. 2; README, "Reward"), as decided here for the edge cases the rule
leaves open; the default `research` reward uses the reference's looser checks instead (actors.research_grammar):
- the response finished with EOS (not truncated by the token budget or the turn limit);
- `<think>`/`</think>` alternate, starting with an opening tag and ending closed, at least one pair; an empty
  `<think></think>` counts (the reference checks counts only);
- every `<search>` is followed, as the very next tags, by `</search>` and then a result block; a `</search>` or a
  `<result>` anywhere else is invalid (a result the policy wrote itself is a hallucinated retrieval), and so is an
  unclosed result block or a stray `</result>`;
- exactly one `<answer>`, immediately followed by its `</answer>` with no tag between, and no tag after it: the
  answer is the final action, so a `<search>` (or a `<think>`) after the answer is invalid, as is an answer opened
  inside an unclosed `<think>`;
- the answer block holds a balanced `\\boxed{...}` (an empty `\\boxed{}` is well-formed; it then scores F1 0).
Searches may sit inside a `<think>` block: the rollout executes them there anyway, and the reference accepts it.
Free text outside tags (before the first tag, between blocks, after `</answer>`) is allowed.
"""

from __future__ import annotations

import re
from typing import NamedTuple

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SEARCH_OPEN = "<search>"
SEARCH_CLOSE = "</search>"
RESULT_OPEN = "<result>"
RESULT_CLOSE = "</result>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
ALL_TAGS: tuple[str, ...] = (
    THINK_OPEN,
    THINK_CLOSE,
    SEARCH_OPEN,
    SEARCH_CLOSE,
    RESULT_OPEN,
    RESULT_CLOSE,
    ANSWER_OPEN,
    ANSWER_CLOSE,
)

_TAG_PATTERN = re.compile("|".join(re.escape(tag) for tag in ALL_TAGS))
_BOXED_PATTERN = re.compile(r"\\boxed\s*\{")
# Formatting wrappers instruct models put around plain answers (\boxed{\text{Paris}}): SQuAD normalisation would
# turn "\text{Paris}" into "textparis" and score F1 0 against "Paris", so the wrapper is removed before scoring.
_TEXT_WRAPPER_PATTERN = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|texttt|mathrm|mathbf|mathit|mbox|emph)"
                                   r"\s*\{([^{}]*)\}")


class _Tag(NamedTuple):
    """One tag outside result blocks, or a whole result block (name RESULT_OPEN, span covering the block)."""

    name: str
    start: int
    end: int


def _scan(response: str) -> tuple[list[_Tag], bool]:
    """Tags the policy wrote, with each result block folded into one item; False if a result block is malformed."""
    tags: list[_Tag] = []
    well_formed = True
    position = 0
    while (match := _TAG_PATTERN.search(response, position)) is not None:
        name = match.group()
        if name == RESULT_OPEN:
            close = response.find(RESULT_CLOSE, match.end())
            if close == -1:
                # An unclosed result block swallows the rest: nothing after it is policy text we could trust.
                tags.append(_Tag(RESULT_OPEN, match.start(), len(response)))
                return tags, False
            position = close + len(RESULT_CLOSE)
            tags.append(_Tag(RESULT_OPEN, match.start(), position))
            continue
        if name == RESULT_CLOSE:
            well_formed = False
        else:
            tags.append(_Tag(name, match.start(), match.end()))
        position = match.end()
    return tags, well_formed


def strip_results(response: str) -> str:
    """The response without its `<result>...</result>` blocks: only the text the policy generated."""
    tags, _ = _scan(response)
    pieces: list[str] = []
    position = 0
    for tag in tags:
        if tag.name == RESULT_OPEN:
            pieces.append(response[position:tag.start])
            position = tag.end
    pieces.append(response[position:])
    return "".join(pieces)


def extract_search_query(text: str) -> str | None:
    """The query of the search call that ends `text` (stripped; "" if empty), or None if it does not end with one."""
    stripped = text.rstrip()
    if not stripped.endswith(SEARCH_CLOSE):
        return None
    end = len(stripped) - len(SEARCH_CLOSE)
    start = stripped.rfind(SEARCH_OPEN, 0, end)
    if start == -1:
        return None
    query = stripped[start + len(SEARCH_OPEN):end]
    # Another tag between them means this </search> closes no <search> of its own (e.g. the nearest <search>
    # sits inside a result block): that is not a search call.
    if _TAG_PATTERN.search(query):
        return None
    return query.strip()


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, nested braces counted; None if absent or unbalanced."""
    matches = list(_BOXED_PATTERN.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    depth = 1
    index = last.end()
    while index < len(text):
        char = text[index]
        if char == "\\":
            # An escaped character (\{, \}, \\) is content, never a brace that opens or closes a group.
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[last.end():index]
        index += 1
    return None


def _unwrap_text_commands(answer: str) -> str:
    """Replace \\text{...}-style wrappers by their content, innermost first."""
    while True:
        unwrapped = _TEXT_WRAPPER_PATTERN.sub(r"\1", answer)
        if unwrapped == answer:
            return answer
        answer = unwrapped


def _answer_block(tags: list[_Tag]) -> tuple[_Tag, _Tag] | None:
    """The single `<answer>` and the `</answer>` right after it, or None."""
    opens = [i for i, tag in enumerate(tags) if tag.name == ANSWER_OPEN]
    closes = [i for i, tag in enumerate(tags) if tag.name == ANSWER_CLOSE]
    if len(opens) != 1 or len(closes) != 1 or closes[0] != opens[0] + 1:
        return None
    return tags[opens[0]], tags[closes[0]]


def extract_answer(response: str) -> str | None:
    """The `\\boxed{}` content inside the single `<answer>` block (text wrappers removed, stripped), else None."""
    tags, _ = _scan(response)
    block = _answer_block(tags)
    if block is None:
        return None
    boxed = extract_boxed(response[block[0].end:block[1].start])
    if boxed is None:
        return None
    return _unwrap_text_commands(boxed).strip()


def is_valid_format(response: str, finished: bool) -> bool:
    """The paper's format check, with the edge cases decided in this module's docstring."""
    if not finished:
        return False
    tags, well_formed = _scan(response)
    if not well_formed:
        return False
    block = _answer_block(tags)
    if block is None or tags[-1] is not block[1]:
        return False
    if extract_boxed(response[block[0].end:block[1].start]) is None:
        return False
    in_think = False
    think_pairs = 0
    expected: str | None = None  # the tag a search call requires next
    for tag in tags[:-2]:
        if expected is not None:
            if tag.name != expected:
                return False
            expected = RESULT_OPEN if tag.name == SEARCH_CLOSE else None
            continue
        if tag.name == THINK_OPEN:
            if in_think:
                return False
            in_think = True
        elif tag.name == THINK_CLOSE:
            if not in_think:
                return False
            in_think = False
            think_pairs += 1
        elif tag.name == SEARCH_OPEN:
            expected = SEARCH_CLOSE
        else:  # a </search> or result block that no <search> asked for
            return False
    return expected is None and not in_think and think_pairs >= 1
