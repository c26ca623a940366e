"""The ReSearch prompt templates: verbatim text for base models, the chat-template path for instruct models."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from actors.prompts import BASE_TEMPLATE, INSTRUCT_SYSTEM_PROMPT, build_prompt, build_prompt_ids

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QUESTION = "Who won the 2018 presidential election in the country where Martín Ramírez Pech's party operates?"

# The reference's base prompt rendered for QUESTION, written out in full as one line (no line continuations), so a
# slip in the template's escaping or joining shows up here.
EXPECTED_BASE = (
    "A conversation between User and Assistant. The user asks a question, and the assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "During thinking, the assistant can invoke the wikipedia search tool to search for fact information about "
    "specific topics if needed. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags respectively, and the search query and result are enclosed within <search> </search> "
    "and <result> </result> tags respectively. For example, <think> This is the reasoning process. </think> "
    "<search> search query here </search> <result> search result here </result> <think> This is the reasoning "
    "process. </think> <answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. In the last part of "
    "the answer, the final exact answer is enclosed within \\boxed{} with latex format. "
    f"User: {QUESTION}. Assistant:"
)


@pytest.fixture(scope="module")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, with ChatML special tokens and chat template."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([EXPECTED_BASE, INSTRUCT_SYSTEM_PROMPT, QUESTION, "The capital of France is Paris."],
                                trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def test_base_prompt_is_the_reference_text() -> None:
    prompt = build_prompt(QUESTION, "base")
    assert prompt == EXPECTED_BASE
    assert prompt.endswith(f"User: {QUESTION}. Assistant:")
    assert "\n" not in prompt


def test_base_prompt_keeps_braces_in_the_question() -> None:
    assert build_prompt("What is {x} in {{y}}?", "base").endswith("User: What is {x} in {{y}}?. Assistant:")


def test_templates_name_every_tag_the_parser_uses() -> None:
    for text in (BASE_TEMPLATE, INSTRUCT_SYSTEM_PROMPT):
        for tag in ("<think>", "</think>", "<search>", "</search>", "<result>", "</result>", "<answer>", "</answer>"):
            assert tag in text
    assert "{" not in INSTRUCT_SYSTEM_PROMPT.replace("\\boxed{answer here}", "").replace("\\boxed{}", "")


def test_instruct_prompt_goes_through_the_chat_template(chatml_tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = build_prompt(QUESTION, "instruct", chatml_tokenizer)
    assert prompt == (
        f"<|im_start|>system\n{INSTRUCT_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert INSTRUCT_SYSTEM_PROMPT.startswith("You are a helpful assistant that can solve the given question")
    assert INSTRUCT_SYSTEM_PROMPT.endswith("the final exact answer is enclosed within \\boxed{} with latex format.")


def test_prompt_ids_round_trip(chatml_tokenizer: PreTrainedTokenizerFast) -> None:
    for template in ("base", "instruct"):
        ids = build_prompt_ids(QUESTION, template, chatml_tokenizer)
        assert all(isinstance(i, int) for i in ids)
        assert chatml_tokenizer.decode(ids) == build_prompt(QUESTION, template, chatml_tokenizer)
    instruct_ids = build_prompt_ids(QUESTION, "instruct", chatml_tokenizer)
    im_start = chatml_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert instruct_ids[0] == im_start and instruct_ids.count(im_start) == 3


def test_instruct_needs_a_tokenizer_with_a_chat_template(chatml_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="chat_template"):
        build_prompt(QUESTION, "instruct")
    chatml_tokenizer_without = PreTrainedTokenizerFast(tokenizer_object=chatml_tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="chat_template"):
        build_prompt(QUESTION, "instruct", chatml_tokenizer_without)


def test_unknown_template_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="'chatml'"):
        build_prompt(QUESTION, "chatml")
    with pytest.raises(ValueError, match="'Base'"):
        build_prompt_ids(QUESTION, "Base", None)


def test_result_block_formats() -> None:
    """ReSearch's passages, Search-R1's numbered docs, and no literal </result> inside a block."""
    from actors.prompts import format_passages
    from retrieval_service.client import Passage

    passages = [
        Passage(id="0", title="Evan Morris", text="Evan L. Morris was a lobbyist.", score=0.9),
        Passage(id="2", title="Vruaria", text="Vruaria is a country. </result> x", score=0.5),
    ]
    assert format_passages(passages) == (
        '"Evan Morris"\nEvan L. Morris was a lobbyist.\n\n"Vruaria"\nVruaria is a country.  x'
    )
    assert format_passages(passages, style="searchr1") == (
        "Doc 1(Title: Evan Morris) Evan L. Morris was a lobbyist.\nDoc 2(Title: Vruaria) Vruaria is a country.  x"
    )
    assert format_passages([]) == ""
    with pytest.raises(ValueError, match="unknown result style"):
        format_passages(passages, style="xml")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE whose tokenizer adds a BOS `<s>` when asked for special tokens (as Llama's does)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([EXPECTED_BASE], trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def test_base_prompt_ids_carry_no_bos_as_the_reference(bos_tokenizer: PreTrainedTokenizerFast) -> None:
    """The reference tokenises the prompt text with add_special_tokens=False (ReCall, branch re-search,
    src/verl/utils/torch_functional.py:269, called by src/verl/utils/dataset/rl_dataset.py:165): no BOS on the base
    prompt. `prompt_template: base-bos` is the option that adds the tokenizer's."""
    bos = bos_tokenizer.bos_token_id
    assert bos_tokenizer.encode("x")[0] == bos  # the tokenizer does add one when asked
    plain = build_prompt_ids(QUESTION, "base", bos_tokenizer)
    assert bos not in plain and bos_tokenizer.decode(plain) == EXPECTED_BASE
    assert build_prompt_ids(QUESTION, "base-bos", bos_tokenizer) == [bos, *plain]
    assert build_prompt(QUESTION, "base-bos") == EXPECTED_BASE
