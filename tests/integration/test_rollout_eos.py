"""Which EOS finishes a response, with real vLLM: a model whose generation_config lists two EOS ids, as
Qwen2.5-Instruct's does (<|im_end|>, the tokenizer's eos_token, and <|endoftext|>).

The reference scores a response that does not end with tokenizer.eos_token 0 ("over length"): ReCall, branch
re-search, src/verl/utils/reward_score/re_search.py:161-164; its rollout keeps such a response as generated
(src/verl/workers/rollout/vllm_rollout/vllm_rollout.py:404-408, "the end is endoftext, not im_end").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actors.config import EngineConfig, SamplingConfig
from actors.prompts import Question, build_prompt_ids
from actors.reward import reward_fn
from actors.rollout import SearchTool, run_trajectory
from tests.scripted_policy import TokenChain, scripted_policy, text_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_eos_policy(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny policy scripted to answer Paris and stop on <|endoftext|>, with both EOS ids in generation_config."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext != tokenizer.eos_token_id
    start = tokenizer.encode("\n", add_special_tokens=False)[-1]  # the chat template's "assistant\n"
    answer = text_path(tokenizer, "<think>", " I know", "</think>", "<answer>", " The final answer is \\boxed{Paris}",
                       "</answer>")
    model = scripted_policy(tiny_dir, TokenChain().path([start, *answer, endoftext]))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, endoftext]
    out = tmp_path_factory.mktemp("two-eos-policy")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [tokenizer.eos_token_id,
                                                                                        endoftext]
    return out


def test_a_response_ending_on_another_eos_id_is_unfinished_and_scored_zero(
    two_eos_policy: Path, run: Callable[..., Any]
) -> None:
    from actors.engine import RolloutEngine

    # also: cpu_reserved_cores=0 gives decode every core of the machine (vLLM's default keeps one for its scheduler)
    engine = RolloutEngine(str(two_eos_policy), EngineConfig(max_model_len=1024, cpu_kvcache_gb=0.25, max_num_seqs=4,
                                                             cpu_reserved_cores=0))
    try:
        assert run(engine.collective_rpc("research_threads")) == [len(os.sched_getaffinity(0))]
        tokenizer = engine.tokenizer
        question = Question("q", build_prompt_ids("Where?", "instruct", tokenizer), ["Paris"])
        never_called = SearchTool(backend=None)  # type: ignore[arg-type]  # the scripted policy never searches
        reward = reward_fn("research")
        ends = {}
        for finish_on in ("eos-token", "any-eos"):
            sampling = SamplingConfig(temperature=0.0, max_response_tokens=64, finish_on=finish_on)
            t = run(run_trajectory(engine, never_called, question, sampling))
            reward(t, ["Paris"])
            assert t.response_ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
            ends[finish_on] = (t.end_reason, t.finished, t.truncated, t.reward, t.answer)
        # The reference's rule (the default): not ending with eos_token is "over length", reward 0; the answer is
        # still extracted (the reference's eval counts <|endoftext|> as an end: active_pipeline.py:77).
        assert ends["eos-token"] == ("other_eos", False, False, 0.0, "Paris")
        assert ends["any-eos"] == ("eos", True, False, pytest.approx(1.0), "Paris")
    finally:
        engine.shutdown()
