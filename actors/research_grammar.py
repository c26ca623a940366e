"""The ReSearch reference's format check and answer extraction, rewritten from its observed behaviour.

The reference (`validate_format` and the boxed-answer extraction of `re_search.py` in the ReSearch verl fork) works
on raw substring counts and positions over the whole response, retrieved passages included. Its rules, in the order
it applies them (the first one broken gives the reason):

1. `<think>` and `</think>` occur equally often ("<think> </think> not paired");
2. at least one of each ("<think> or </think> not found"); their order and nesting are never checked;
3. exactly one `<answer>` and one `</answer>` ("<answer> or </answer> not found"); a passage quoting either tag
   therefore breaks the format, and text or tags after `</answer>` are allowed;
4. from each `<search>` (scanning on from the previous pair's `</result>`), the next `</search>`, `<result>` and
   `</result>` all exist ("search/result tags are incomplete") and come in that order ("... nested in the wrong
   order"); a `</search>`, `<result>` or `</result>` that no `<search>` leads to is never looked at;
5. `<answer>` comes before `</answer>`, and the text from `<answer>` to `</answer>` contains the literal `\\boxed{`
   and a `}` ("answer is missing \\boxed{} format"); `\\boxed {x}` (with a space) alone therefore fails.

The answer is the content of the last `\\boxed` in the answer block: if the block contains `\\boxed ` (with a
space) anywhere, everything after the last `\\boxed ` up to the first `$`; otherwise the braces from the last
`\\boxed` are counted (no escapes) to the brace that closes the first one, and the span must read `\\boxed{...}`.
Where that fails (unbalanced braces, `\\boxed` not followed by `{`) the reference raises and scores 0. No LaTeX
wrapper is removed: `\\boxed{\\text{Paris}}` answers "\\text{Paris}", which normalises to "textparis".

Not reproduced: the reference finds the response by splitting the decoded prompt + response on the template's
assistant marker ("<|im_start|>assistant\\n", else "Assistant:") and keeping the second piece, so a response that
itself contains the marker is cut there (and then fails its EOS check). Here the response text is given directly.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
SEARCH_OPEN = "<search>"
SEARCH_CLOSE = "</search>"
RESULT_OPEN = "<result>"
RESULT_CLOSE = "</result>"
BOXED = "\\boxed"
BOXED_SPACE = "\\boxed "
BOXED_OPEN = "\\boxed{"


def _search_result_problem(text: str) -> str | None:
    """Rule 4: each `<search>` is followed by `</search>`, `<result>`, `</result>` in that order."""
    position = 0
    while (search_open := text.find(SEARCH_OPEN, position)) != -1:
        search_close = text.find(SEARCH_CLOSE, search_open)
        result_open = text.find(RESULT_OPEN, search_open)
        if search_close == -1 or result_open == -1:
            return "search/result tags are incomplete"
        result_close = text.find(RESULT_CLOSE, result_open)
        if result_close == -1:
            return "search/result tags are incomplete"
        if not search_open < search_close < result_open < result_close:
            return "search/result tags are nested in the wrong order"
        # The scan resumes at the `</result>`: a `<search>` quoted inside a passage of this pair is skipped, one in
        # a later passage is not.
        position = result_close
    return None


def format_problem(text: str) -> str | None:
    """Why the reference rejects the format of `text` (its reason string), or None when it accepts it."""
    if text.count(THINK_OPEN) != text.count(THINK_CLOSE):
        return "<think> </think> not paired"
    if text.count(THINK_OPEN) == 0:
        return "<think> or </think> not found"
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return "<answer> or </answer> not found"
    problem = _search_result_problem(text)
    if problem is not None:
        return problem
    answer_open = text.find(ANSWER_OPEN)
    answer_close = text.find(ANSWER_CLOSE)
    if answer_open > answer_close:
        return "<answer> must be before </answer>"
    answer_span = text[answer_open:answer_close]
    if BOXED_OPEN not in answer_span or "}" not in answer_span:
        return "answer is missing \\boxed{} format"
    return None


def answer_block(text: str) -> str | None:
    """Text between the first `<answer>` and the first `</answer>` after it, or None."""
    start = text.find(ANSWER_OPEN)
    if start == -1:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    return None if end == -1 else text[start:end]


def boxed_answer(block: str) -> str | None:
    """The reference's answer inside an answer block (unstripped), or None where the reference raises."""
    if BOXED_SPACE in block:
        return block.rsplit(BOXED_SPACE, 1)[1].split("$", 1)[0]
    start = block.rfind(BOXED)
    if start == -1:
        # The reference would fall back to \fbox here, but then fails its own "\boxed{" prefix check.
        return None
    depth = 0
    for index in range(start, len(block)):
        char = block[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                span = block[start:index + 1]
                return span[len(BOXED_OPEN):-1] if span.startswith(BOXED_OPEN) else None
    return None


def extract_answer(response: str) -> str | None:
    """The reference's answer of a response (unstripped), or None when it has no answer block or boxed answer."""
    block = answer_block(response)
    return None if block is None else boxed_answer(block)
