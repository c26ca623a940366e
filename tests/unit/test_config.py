"""The typed config: presets load, overrides apply, unknown keys and wrong types name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import (
    CONFIGS_DIR,
    ConfigError,
    JobConfig,
    build_config,
    load_config,
    looks_local,
    parse_override,
)

PRESETS = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_every_preset_loads() -> None:
    assert {p.stem for p in PRESETS} >= {
        "test-tiny", "demo-cpu", "qwen2.5-7b-instruct", "qwen2.5-7b-base", "qwen2.5-32b-instruct"
    }
    for preset in PRESETS:
        config = load_config(preset)
        assert isinstance(config, JobConfig)
        assert config.name == preset.stem


@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct", "qwen2.5-7b-base", "qwen2.5-32b-instruct"])
def test_paper_presets_hold_the_paper_settings(name: str) -> None:
    config = load_config(name)
    assert config.learner.lr == 1e-6
    assert config.trainer.batch_size == 256
    assert config.rollout.group_size == 5
    assert config.rollout.sampling.temperature == 1.0
    assert config.learner.grpo.kl_coef == 0.001 and config.learner.grpo.kl_estimator == "k3"
    assert config.learner.grpo.clip == 0.2
    assert config.trainer.epochs == 2
    assert config.rollout.max_prompt_tokens == 512
    assert config.rollout.sampling.max_response_tokens == 8192
    assert config.retrieval.topk == 5
    assert config.retrieval.encoder.name_or_path == "intfloat/e5-base-v2"
    assert config.rollout.prompt_template == ("base" if name.endswith("base") else "instruct")
    # rollout engines use as many GPUs as their tensor-parallel degree
    assert config.rollout.gpus_per_actor == config.rollout.engine.tensor_parallel_size


def test_overrides_apply_with_yaml_types() -> None:
    config = load_config(
        "test-tiny", ["learner.lr=3e-5", "rollout.sampling.temperature=0", "trainer.max_staleness=1",
                      "retrieval.urls=[http://127.0.0.1:1, http://127.0.0.1:2]", "learner.adam_betas=[0.9, 0.95]"]
    )
    assert config.learner.lr == 3e-5
    assert config.rollout.sampling.temperature == 0
    assert config.trainer.max_staleness == 1
    assert config.retrieval.urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert config.learner.adam_betas == (0.9, 0.95)


def test_unknown_override_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"learner\.lrr"):
        load_config("test-tiny", ["learner.lrr=1"])
    with pytest.raises(ConfigError, match=r"rollout\.sampling\.temprature"):
        load_config("test-tiny", ["rollout.sampling.temprature=1"])
    with pytest.raises(ConfigError, match=r"nosuchsection"):
        load_config("test-tiny", ["nosuchsection.x=1"])


def test_unknown_key_in_yaml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("learner:\n  zero_stag: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learner\.zero_stag'"):
        load_config(path)


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"trainer\.batch_size"):
        load_config("test-tiny", ["trainer.batch_size=many"])
    with pytest.raises(ConfigError, match=r"learner\.zero_stage"):
        load_config("test-tiny", ["learner.zero_stage=5"])
    with pytest.raises(ConfigError, match=r"learner\.lr"):
        build_config({"learner": {"lr": -1}})


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("learner.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("test-tiny", ["name.x=1"])
    assert parse_override("a.b=") == ("a.b", "")


def test_missing_file_lists_presets() -> None:
    with pytest.raises(ConfigError, match="test-tiny"):
        load_config("does-not-exist")


def test_every_field_is_documented() -> None:
    """CleanRL's habit: every config field says what it is where it is defined."""
    seen: set[type] = set()

    def walk(model: type) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(JobConfig)
    assert len(seen) >= 8


def test_run_dir_default_and_explicit() -> None:
    config = load_config("test-tiny")
    assert config.resolved_run_dir().parent == Path.cwd() / "runs"  # absolute: actors do not share our cwd
    assert config.resolved_run_dir().name.startswith("test-tiny-")
    assert str(load_config("test-tiny", ["run_dir=/tmp/x"]).resolved_run_dir()) == "/tmp/x"


def test_learner_temperature_and_ratio_denominator_follow_sampling() -> None:
    from cluster.config import JobConfig

    def resolved(tree: dict) -> tuple[float | None, str]:
        grpo = JobConfig.model_validate(tree).resolved_learner().grpo
        return grpo.temperature, grpo.old_logprobs

    assert resolved({}) == (1.0, "behaviour")
    assert resolved({"rollout": {"sampling": {"temperature": 0.7}}}) == (0.7, "recompute")
    assert resolved({"rollout": {"sampling": {"top_p": 0.9}}}) == (1.0, "recompute")
    assert resolved({"rollout": {"sampling": {"temperature": 0.0}}}) == (1.0, "behaviour")
    chosen = {"rollout": {"sampling": {"temperature": 0.7}}, "learner": {"grpo": {"temperature": 1.0, "old_logprobs": "behaviour"}}}
    assert resolved(chosen) == (1.0, "behaviour")
    # The job config itself keeps what the user wrote, so a dumped config re-resolves after a sampling change.
    config = JobConfig.model_validate({"rollout": {"sampling": {"temperature": 0.7}}})
    assert config.learner.grpo.temperature is None and config.learner.grpo.old_logprobs == "auto"
    changed = JobConfig.model_validate({**config.model_dump(), "rollout": {"sampling": {"temperature": 0.5}}})
    assert changed.resolved_learner().grpo.temperature == 0.5


def test_ratio_denominators_that_mix_tempered_and_untempered_logprobs_are_refused() -> None:
    """vLLM returns untempered logprobs: 'behaviour' and the decoupled weight are only right at plain sampling."""
    with pytest.raises(ConfigError, match="old_logprobs=behaviour"):
        load_config("test-tiny", ["rollout.sampling.temperature=0.7", "learner.grpo.old_logprobs=behaviour"])
    with pytest.raises(ConfigError, match="decoupled objective"):
        load_config("test-tiny", ["rollout.sampling.top_p=0.9", "trainer.max_staleness=1"])
    # Plain sampling with stale data: the decoupled objective is switched on when old logprobs are recomputed.
    grpo = load_config("test-tiny", ["trainer.max_staleness=1", "learner.grpo.old_logprobs=recompute"]
                       ).resolved_learner().grpo
    assert grpo.decoupled is True
    assert load_config("test-tiny", ["trainer.max_staleness=1"]).resolved_learner().grpo.decoupled is False
    assert load_config("test-tiny", ["learner.grpo.old_logprobs=recompute"]).resolved_learner().grpo.decoupled is False


def test_paper_presets_follow_the_reference_regularisers() -> None:
    """Entropy bonus 0.001 and AdamW weight decay 0.01 are what the ReSearch reference runs with (verl defaults)."""
    for name in ("qwen2.5-7b-instruct", "qwen2.5-7b-base", "qwen2.5-32b-instruct"):
        config = load_config(name)
        assert config.learner.grpo.entropy_coef == 0.001 and config.learner.weight_decay == 0.01
        assert config.rollout.sampling.max_turns is None  # the reference has no turn limit
        assert config.learner.grpo.old_logprobs == "recompute"  # bf16 vLLM and learner logprobs differ on GPUs


def test_paper_presets_follow_the_reference_in_the_last_details() -> None:
    """The differences issue 23 closed, each as the reference does it (ReCall, branch re-search): only the tokenizer's
    eos_token finishes a response (src/verl/utils/reward_score/re_search.py:161), micro-batch token means weighted by
    trajectories (src/verl/workers/actor/dp_actor.py:276), the partial batch dropped
    (src/verl/trainer/ppo/ray_trainer.py:484), an empty query searched (vllm_rollout.py:416), the eval's
    over-length prediction "" and 'nothing to search' (src/flashrag/pipeline/active_pipeline.py:74, 95), no BOS."""
    for name in ("qwen2.5-7b-instruct", "qwen2.5-7b-base", "qwen2.5-32b-instruct"):
        config = load_config(name)
        assert config.rollout.sampling.finish_on == "eos-token"
        assert config.learner.grpo.micro_batch_weight == "sequences" and config.learner.grpo.agg == "token-mean"
        assert config.trainer.drop_last
        assert config.retrieval.empty_query_result is None
        assert config.eval.truncated_answer == "empty" and config.eval.empty_query_result == "nothing to search"
        assert config.rollout.prompt_template in ("base", "instruct")  # not base-bos
    others = load_config("test-tiny", ["rollout.sampling.finish_on=any-eos", "learner.grpo.micro_batch_weight=tokens",
                                       "trainer.drop_last=false", "retrieval.empty_query_result=invalid query",
                                       "eval.truncated_answer=keep", "rollout.prompt_template=base-bos"])
    assert (others.rollout.sampling.finish_on, others.learner.grpo.micro_batch_weight, others.trainer.drop_last,
            others.retrieval.empty_query_result, others.eval.truncated_answer, others.rollout.prompt_template) == (
        "any-eos", "tokens", False, "invalid query", "keep", "base-bos")


@pytest.mark.parametrize(("overrides", "keys"), [
    # tensor parallel 4 on an actor that reserves 2 GPUs
    (["rollout.engine.tensor_parallel_size=4"], ["rollout.engine.tensor_parallel_size", "rollout.gpus_per_actor"]),
    # 0 GPUs per rollout actor on a GPU preset
    (["rollout.gpus_per_actor=0"], ["learner.gpus_per_rank", "rollout.gpus_per_actor"]),
    # a response budget the engine cannot hold
    (["rollout.engine.max_model_len=4096"], ["rollout.engine.max_model_len", "rollout.max_prompt_tokens",
                                              "rollout.sampling.max_response_tokens"]),
    # one sample per prompt: every GRPO advantage is 0
    (["rollout.group_size=1"], ["rollout.group_size"]),
    (["retrieval.urls=[http://10.0.0.1:8000, 'localhost:8000']"], ["retrieval.urls[1]"]),
    (["retrieval.urls=['http://10.0.0.1:99999']"], ["retrieval.urls[0]"]),
    (["retrieval.urls=['ftp://10.0.0.1']"], ["retrieval.urls[0]"]),
])
def test_configs_that_cannot_run_are_one_line_errors_naming_the_keys(overrides: list[str], keys: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("qwen2.5-7b-instruct", overrides)
    message = str(caught.value)
    assert "\n" not in message and "config key ''" not in message
    assert "'name'" not in message and "policy" not in message  # not the whole config
    for key in keys:
        assert key in message


def test_section_validator_errors_do_not_print_the_section() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("test-tiny", ["retrieval.server.faiss_gpu=true"])
    assert "retrieval.replica_gpus" in str(caught.value) and "'topk'" not in str(caught.value)


def test_duplicate_yaml_keys_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("learner:\n  lr: 1.0e-6\n  zero_stage: 3\n  lr: 3.0e-6\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(lines 2 and 4\)"):
        load_config(path)
    path.write_text("learner: {lr: 1.0e-6}\nlearner: {zero_stage: 3}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'learner'"):
        load_config(path)


def test_local_policy_path_and_wandb_are_checked_before_ray_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import ray

    from cluster.train import main

    missing = tmp_path / "no-such-policy"
    assert main(["test-tiny", f"policy.name_or_path={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "policy.name_or_path" in err and str(missing) in err and len(err.splitlines()) == 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # 'models/policy' now names a directory here, not a hub id
    assert looks_local("models/policy") and not looks_local("Qwen/Qwen2.5-7B") and not looks_local("tiny-random-qwen2")
    assert main(["test-tiny", "policy.name_or_path=models/policy"]) == 2
    assert "policy.name_or_path" in capsys.readouterr().err
    if importlib.util.find_spec("wandb") is None:
        assert main(["test-tiny", "logging.wandb_project=research"]) == 2
        err = capsys.readouterr().err.strip()
        assert "logging.wandb_project" in err and "pip install" in err and len(err.splitlines()) == 1
    assert not ray.is_initialized()


def test_explain_shows_a_list_of_node_groups() -> None:
    from cluster.config import explain_config

    text = explain_config(load_config("test-tiny", ["hardware.nodes=[{count: 2, cpus: 8, resources: {x: 1}}]"]))
    assert 'hardware.nodes = [{"name": null, "count": 2, "cpus": 8.0' in text
