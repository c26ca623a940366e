"""The ReSearch prompt templates, verbatim, and the functions that turn a question into the prompt the policy sees.

Source of both texts: the ReSearch reference code (github.com/Agent-RL/ReSearch, `src/verl/utils/dataset/template.py`,
names `re_search_template` and `re_search_template_sys`); the paper (arXiv 2503.19470, Table 1) prints the same texts
except that its example answer reads `\\boxed{answer here}` where the code reads `\\[ \\boxed{answer here} \\]`.
The code's version is kept because it is the one the released ReSearch models were trained and evaluated with.
The Python string literals below are written as in the reference (line continuations, doubled braces for
`str.format`), so the rendered text matches it character for character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

PromptTemplate = Literal["base", "base-bos", "instruct"]
"""Which template a run uses: plain-text for base models, a system prompt through the chat template for instruct;
"base-bos" is the base text with the tokenizer's special tokens (its BOS) added, which the reference does not do."""

# For base models: the whole prompt, with the question in place of {prompt}.
BASE_TEMPLATE = """A conversation between User and Assistant. \
The user asks a question, and the assistant solves it. \
The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. \
During thinking, the assistant can invoke the wikipedia search tool to search for fact information about specific topics if needed. \
The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags respectively, \
and the search query and result are enclosed within <search> </search> and <result> </result> tags respectively. \
For example, <think> This is the reasoning process. </think> <search> search query here </search> <result> search result here </result> \
<think> This is the reasoning process. </think> <answer> The final answer is \\[ \\boxed{{answer here}} \\] </answer>. \
In the last part of the answer, the final exact answer is enclosed within \\boxed{{}} with latex format. \
User: {prompt}. Assistant:"""

# For instruct models: the system message; the question is the user message (no formatting applied to this text).
INSTRUCT_SYSTEM_PROMPT = """You are a helpful assistant that can solve the given question step by step with the help of the wikipedia search tool. \
Given a question, you need to first think about the reasoning process in the mind and then provide the answer. \
During thinking, you can invoke the wikipedia search tool to search for fact information about specific topics if needed. \
The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags respectively, \
and the search query and result are enclosed within <search> </search> and <result> </result> tags respectively. \
For example, <think> This is the reasoning process. </think> <search> search query here </search> <result> search result here </result> \
<think> This is the reasoning process. </think> <answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. \
In the last part of the answer, the final exact answer is enclosed within \\boxed{} with latex format."""

TEMPLATES: tuple[str, ...] = ("base", "base-bos", "instruct")


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}")


def build_prompt(question: str, template: str, tokenizer: Any = None) -> str:
    """The prompt text for `question`: the base template filled in, or the chat template applied to system + user."""
    _check_template(template)
    if template in ("base", "base-bos"):
        return BASE_TEMPLATE.format(prompt=question)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("the 'instruct' prompt template needs a tokenizer with a chat_template")
    messages = [
        {"role": "system", "content": INSTRUCT_SYSTEM_PROMPT},
        {"role": "user", "content": question},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class Question:
    """One question as it travels from the dataset to a rollout actor: its id, prompt token ids, golden answers."""

    prompt_id: str
    prompt_ids: list[int]
    golden_answers: list[str]
    text: str = ""


def build_prompt_ids(question: str, template: str, tokenizer: Any) -> list[int]:
    """The prompt's token ids, ready to hand to the engine."""
    text = build_prompt(question, template, tokenizer)
    # As the reference: the prompt text is tokenised without special tokens, base and chat alike (ReCall re-search,
    # src/verl/utils/torch_functional.py:269), so a base prompt gets no BOS (a chat template writes its own).
    # Qwen2.5 tokenizers add none either way; "base-bos" asks for the tokenizer's BOS on the base prompt.
    return list(tokenizer.encode(text, add_special_tokens=(template == "base-bos")))


# ---- what the environment inserts after a search call ----------------------------------------------------------------
RESULT_TEMPLATE = " <result>\n{}\n</result>"
"""The block inserted after `</search>` (ReSearch's rollout writes exactly this framing)."""
EMPTY_QUERY_RESULT = "invalid query"
"""What the reference's search() answers an empty query (its rollout calls batch_search, which searches it): a
value for `retrieval.empty_query_result`, which by default searches the empty string as the reference's rollout."""
RETRIEVAL_ERROR_RESULT = "Search failed: the retrieval service did not answer. Continue without this result."
"""Result text when retrieval gave up after its retries; counted in the trajectory's `retrieval_errors`."""
ResultStyle = Literal["research", "searchr1"]


def format_passages(passages: list[Any], style: ResultStyle = "research") -> str:
    """The text inside a result block: ReSearch's `"Title"\\ntext` passages, or Search-R1's `Doc i(Title: t) text`.

    A literal `</result>` in a passage would end the block early, so it is removed.
    """
    if style == "research":
        text = "\n\n".join(f'"{p.title}"\n{p.text}' for p in passages).strip()
    elif style == "searchr1":
        text = "\n".join(f"Doc {i}(Title: {p.title}) {p.text}" for i, p in enumerate(passages, start=1))
    else:
        raise ValueError(f"unknown result style {style!r}; expected 'research' or 'searchr1'")
    return text.replace("</result>", "")
