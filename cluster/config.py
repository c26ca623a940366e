"""The job's typed configuration: per-component models composed here, loaded from YAML plus dotted overrides."""

from __future__ import annotations

import datetime as _dt
import difflib
import importlib.util
import json
import textwrap
import types
import typing
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from actors.config import RolloutConfig
from learner.config import LearnerConfig, plain_sampling
from retrieval_service.config import RetrievalConfig


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the offending key."""


class PolicyConfig(BaseModel):
    """The policy being trained: a built-in name, a local directory, or a hub id."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        "tiny-random-qwen2",
        description="'tiny-random-qwen2' (built on the fly), 'smollm2-135m-instruct' (packaged), a directory or hub id.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id; None = same as the policy.")


class TrainPoolConfig(BaseModel):
    """Which training questions GRPO samples (our addition; all of them by default, as in the paper). Filters need
    question metadata the synthetic world writes (hops, supporting passages) and the real retrieval service
    (cluster/train_pool.py); what was kept and why is written to run_dir/pool.json."""

    model_config = ConfigDict(extra="forbid")

    hops: list[int] = Field(default_factory=list, description="Keep only questions with these hop counts "
                            "(metadata.hops); empty = every question.")
    first_search_misses: bool = Field(False, description="Drop questions whose first search (the question itself as "
                                      "the query, at retrieval.topk) already returns a golden answer: on those one "
                                      "search earns full reward, so GRPO has no reason to prefer a second.")
    second_search_finds: bool = Field(False, description="2-hop questions: keep only those a two-search trajectory "
                                      "can answer: the first result names the bridge entity and a search for the "
                                      "bridge by name returns a golden answer (the warm start's expert route).")
    exclude_warm_start: bool = Field(False, description="Drop the questions the format warm start trained on, so RL "
                                     "is measured on questions the policy never imitated.")


class DataConfig(BaseModel):
    """Training and validation questions, in any format qa/ reads."""

    model_config = ConfigDict(extra="forbid")

    train_files: list[str] = Field(default_factory=list, description="Training question files; empty = the synthetic world's train.jsonl.")
    val_files: list[str] = Field(default_factory=list, description="Validation files; empty = the world's dev.jsonl.")
    val_size: int = Field(100, ge=0, description="Validation questions drawn (seeded) from val_files; the paper uses 100.")
    max_train_questions: int | None = Field(None, ge=1, description="Cap on training questions (None = all).")
    world_passages: int = Field(2000, ge=50, description="Corpus size of the synthetic world when one is generated.")
    world_seed: int = Field(0, description="Seed of the synthetic world.")
    world_dev: int | None = Field(None, ge=1, description="Held-out (dev) questions the synthetic world draws, half "
                                  "1-hop and half 2-hop; None = its default (a tenth of train, at most 500).")
    val_per_hop: dict[int, int] = Field(default_factory=dict, description="Validation questions drawn (seeded) per "
                                        "hop count, e.g. {1: 16, 2: 64}; replaces val_size when set (needs hops in "
                                        "the questions' metadata, as the synthetic world writes).")
    pool: TrainPoolConfig = Field(default_factory=TrainPoolConfig, description="Filters on the RL training pool.")


class TrainerConfig(BaseModel):
    """The driver's loop: epochs, batch, staleness, evaluation and checkpoint cadence."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1, description="Passes over the training questions (the paper: 2).")
    batch_size: int = Field(256, ge=1, description="Prompts per policy update (each sampled group_size times).")
    drop_last: bool = Field(
        True, description="Drop each epoch's last partial batch (those prompts, different ones each epoch, are not "
        "trained on in that epoch), as the reference's DataLoader does; false = train it (partial batch).",
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many policy updates (None = run all epochs).")
    max_staleness: int = Field(0, ge=0, description="Policy versions generation may run ahead of learning (0 = on-policy).")
    val_every: int = Field(10, ge=0, description="Greedy validation every K steps (0 = only before and after).")
    val_samples: int = Field(0, ge=0, description="Besides the greedy one, trajectories sampled per validation "
                             "question at the training temperature (val/*_sampled metrics, run_dir/validation.jsonl "
                             "and the before/after 'learning' block of summary.json); 0 = greedy only.")
    save_every: int = Field(50, ge=0, description="Checkpoint every K steps (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk: older ones are deleted after each "
                                  "save (a 7B ZeRO-3 checkpoint is ~107 GB).")
    wait_log_every_s: float = Field(30.0, gt=0.0, description="While waiting for actors to start (learner ranks, "
                                    "rollout engines, retrieval replicas), log what is still pending this often.")
    max_learner_restarts: int = Field(
        1, ge=0, description="When a learner rank dies, rebuild the learner group from the last checkpoint this many "
        "times per run (the data position is restored with it); 0 = the job ends and a person runs --resume.",
    )
    stop_grace_s: float = Field(
        120.0, ge=0, description="On SIGTERM/SIGINT, how long the update in progress may take to finish before the "
        "job stops at the last checkpoint instead (ray job stop waits only $RAY_JOB_STOP_WAIT_TIME_S, 3 s by default).",
    )


class WarmStartConfig(BaseModel):
    """Format warm start (our addition; the paper's 7B models need none): a few supervised steps on expert
    trajectories built from the synthetic world's facts and the real retrieval service, before GRPO
    (cluster/warm_start.py). The result is cached under $RESEARCH_CACHE/warm/<hash of its inputs>."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Run the warm start before GRPO and train from its policy (off in the "
                          "paper presets, on in the CPU presets).")
    questions: int = Field(48, ge=1, description="1-hop training questions turned into expert trajectories.")
    two_hop_questions: int = Field(0, ge=0, description="2-hop training questions turned into two-search expert "
                                   "trajectories (search the question, then the entity its result names), so that "
                                   "GRPO sees multi-search samples to amplify.")
    epochs: int = Field(2, ge=1, description="Passes over the expert trajectories.")
    batch_size: int = Field(8, ge=1, description="Expert trajectories per optimizer step.")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate of the supervised steps.")
    cpus: float = Field(2.0, gt=0.0, description="CPUs (and so torch threads) of the warm-start learner; it runs "
                        "alone, before any rollout actor starts.")
    held_out: int = Field(0, ge=0, description="Expert trajectories kept out of training: their NLL is measured "
                          "after every step and decides when to stop (stop_nll); 0 = train every epoch.")
    stop_nll: float = Field(0.0, ge=0.0, description="Stop once the held-out experts' token-mean NLL falls to this "
                            "(nats/token): a floor that keeps the policy from collapsing onto the expert phrasing "
                            "and so keeps sampling diverse for GRPO; 0 = no early stop.")


class EvalConfig(BaseModel):
    """How research eval scores its greedy rollouts (the rest of the eval setting is the training config's)."""

    model_config = ConfigDict(extra="forbid")

    truncated_answer: Literal["empty", "keep"] = Field(
        "empty", description="A response cut by the token budget (end_reason 'length'): 'empty' = its prediction "
        "is empty, so EM, F1, cover EM and the judge give it nothing, as the reference's eval does; 'keep' = the "
        "answer it wrote before the cut is scored.",
    )
    empty_query_result: str | None = Field(
        "nothing to search", description="Text inserted for a search call with an empty query during eval (the "
        "reference's eval inserts 'nothing to search'); None = search the empty string, as training does by default "
        "(retrieval.empty_query_result).",
    )


class LoggingConfig(BaseModel):
    """Where metrics go besides the JSONL file and TensorBoard."""

    model_config = ConfigDict(extra="forbid")

    wandb_project: str | None = Field(None, description="Weights & Biases project; None disables W&B.")
    tensorboard: bool = Field(True, description="Write TensorBoard scalars under run_dir/tensorboard.")
    samples: int = Field(4, ge=0, description="Validation trajectories written in full (prompt, response, retrieved "
                         "results, reward parts) to run_dir/samples.jsonl and TensorBoard text at every validation.")
    progress: bool | None = Field(
        None, description="One live line per step on stderr (reward, searches, seconds, ETA); None = when stderr is "
        "a terminal.")


class NodeGroupConfig(BaseModel):
    """A group of identical nodes of the cluster, as Ray sees each one (for `research plan`'s placement check)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Name shown in the plan (default: group<index>).")
    count: int = Field(1, ge=1, description="Nodes in the group.")
    cpus: float = Field(..., ge=0, description="Logical CPUs Ray gets on each node (ray start --num-cpus).")
    gpus: float = Field(0.0, ge=0, description="GPUs on each node (ray start --num-gpus).")
    memory_gib: float | None = Field(None, gt=0, description="RAM of each node in GiB (None = "
                                     "hardware.host_memory_gib); Ray's memory resource is what its object store "
                                     "(30 %, at most 200 GB) leaves.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources each node advertises "
                                        "(ray start --resources), e.g. {learner_node: 8}.")
    head: bool = Field(False, description="The group's first node is the Ray head (retrieval replicas avoid it).")


class HardwareConfig(BaseModel):
    """The machines the job is meant for, as research plan needs them to say whether it fits; nothing else reads it."""

    model_config = ConfigDict(extra="forbid")

    gpu: str | None = Field(None, description="GPU model, for the reader (e.g. 'A100-SXM4-40GB (p4d.24xlarge)').")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory of one GPU in GiB (A100 40GB = 40, A100/H100 80GB = 80); needed to plan a "
        "GPU job, unused on CPU.",
    )
    host_memory_gib: float | None = Field(
        None, gt=0, description="RAM of one node in GiB (p4d/p4de.24xlarge: 1152); None = this machine's RAM."
    )
    launch_files: list[str] = Field(
        default_factory=list, description="Launch files (cluster/launch/...) the job is sized for: research plan "
        "places its learner ranks, rollout actors and retrieval replicas on the nodes each one advertises and "
        "checks that their GPUs have gpu_memory_gib (for the Slurm script: the smallest sbatch --nodes that fits).",
    )
    nodes: list[NodeGroupConfig] = Field(
        default_factory=list, description="The cluster's node groups when it is none of the launch files: research "
        "plan places the job on them too.",
    )


class JobConfig(BaseModel):
    """A whole training job; every section is the owning component's own model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("research", description="Run name; the default run_dir is runs/<name>-<timestamp>.")
    seed: int = Field(0, description="Seed of data order, sampling and initialisation.")
    run_dir: str | None = Field(
        None, description="Where checkpoints, metrics, logs and plots go; on a multi-node cluster an absolute path "
        "on storage every node mounts (learner ranks write checkpoints there). Unset = runs/<name>-<timestamp> "
        "under the current directory, allowed only on a one-node cluster.",
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="The model being trained.")
    data: DataConfig = Field(default_factory=DataConfig, description="Questions.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout actors and sampling.")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description="The retrieval service.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="The DeepSpeed learner and GRPO.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="The training loop.")
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig,
                                        description="Format warm start before GRPO (our addition).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Scoring of research eval.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metric sinks.")
    hardware: HardwareConfig = Field(default_factory=HardwareConfig, description="GPU and host memory (`research plan`).")

    def resolved_learner(self) -> LearnerConfig:
        """The learner config the job runs: it scores tokens at the temperature they were sampled at and picks its
        ratio denominator from the sampling (a copy: the job config keeps 'unset' and 'auto' as the user wrote)."""
        sampling = self.rollout.sampling
        grpo = self.learner.grpo.resolved(sampling.temperature, sampling.top_p, sampling.top_k,
                                          self.trainer.max_staleness)
        return self.learner.model_copy(update={"grpo": grpo})

    @model_validator(mode="after")
    def _objective_matches_sampling(self) -> JobConfig:
        """Refuse ratio denominators that would divide tempered by untempered logprobs: vLLM returns the raw
        (temperature-1, unfiltered) logprob of each sampled token."""
        sampling, grpo = self.rollout.sampling, self.resolved_learner().grpo
        if plain_sampling(grpo.logit_temperature, sampling.top_p, sampling.top_k):
            return self
        if grpo.old_logprobs == "behaviour":
            raise ValueError("learner.grpo.old_logprobs=behaviour with temperature != 1 or top-p/top-k sampling "
                             "divides tempered by vLLM's untempered logprobs; use 'recompute' (or 'auto')")
        if grpo.decoupled:
            raise ValueError("the decoupled objective (trainer.max_staleness > 0) needs the sampler's own logprobs, "
                             "but vLLM returns untempered ones: sample at temperature 1 without top-p/top-k, or set "
                             "trainer.max_staleness=0")
        return self

    @model_validator(mode="after")
    def _runnable(self) -> JobConfig:
        """Refuse combinations every field of which is valid alone but that cannot run (cross_field_problems)."""
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolved_run_dir(self) -> Path:
        """run_dir, or runs/<name>-<timestamp> when unset, made absolute (actors on this node share the driver's
        view of it only through an absolute path: their working directory is Ray's, not ours)."""
        if self.run_dir:
            return Path(self.run_dir).expanduser().absolute()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return (Path("runs") / f"{self.name}-{stamp}").absolute()


def cross_field_problems(config: JobConfig) -> list[str]:
    """What makes a config unrunnable although every field is valid alone, one message per problem, each naming
    the keys: these used to pass `research config` and `plan` and fail only once Ray and the engines had started."""
    rollout, learner, engine = config.rollout, config.learner, config.rollout.engine
    problems = []
    if rollout.gpus_per_actor > 0 and rollout.gpus_per_actor != engine.tensor_parallel_size:
        # vLLM starts one worker per tensor-parallel rank, each on its own GPU of the actor's reservation.
        problems.append(f"rollout.engine.tensor_parallel_size={engine.tensor_parallel_size} needs "
                        f"rollout.gpus_per_actor={engine.tensor_parallel_size} (got {rollout.gpus_per_actor:g}): "
                        "each tensor-parallel worker takes one GPU of its actor's reservation")
    if (learner.gpus_per_rank > 0) != (rollout.gpus_per_actor > 0):
        # The weight broadcast is NCCL between GPUs or gloo between CPUs, never one side of each.
        problems.append(f"learner.gpus_per_rank={learner.gpus_per_rank:g} and rollout.gpus_per_actor="
                        f"{rollout.gpus_per_actor:g}: a GPU job reserves GPUs for both (learner ranks and rollout "
                        "actors), a CPU job for neither")
    if rollout.gpus_per_actor == 0 and engine.tensor_parallel_size > 1:
        problems.append(f"rollout.engine.tensor_parallel_size={engine.tensor_parallel_size} on CPU "
                        "(rollout.gpus_per_actor=0): tensor parallelism needs one GPU per worker")
    longest = rollout.max_prompt_tokens + rollout.sampling.max_response_tokens
    if engine.max_model_len < longest:
        problems.append(f"rollout.engine.max_model_len={engine.max_model_len} is below rollout.max_prompt_tokens + "
                        f"rollout.sampling.max_response_tokens = {longest}: the engine would refuse long prompts "
                        "or cut responses short of their budget")
    if rollout.group_size < 2:
        problems.append(f"rollout.group_size={rollout.group_size}: GRPO's advantage is a sample's reward against "
                        "its group's, so with one sample per prompt every advantage is 0 and nothing is learnt")
    for index, url in enumerate(config.retrieval.urls):
        problem = url_problem(url)
        if problem:
            problems.append(f"retrieval.urls[{index}] = {url!r}: {problem}")
    return problems


def url_problem(url: str) -> str | None:
    """Why `url` is not a usable http(s)://host[:port][/path] service address, or None when it is."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as err:
        return str(err)
    if parts.scheme not in ("http", "https"):
        return "not an http:// or https:// URL"
    if not parts.hostname:
        return "no host"
    if port == 0:
        return "port 0"
    if parts.query or parts.fragment:
        return "a query or fragment has no place in a service address"
    return None


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The pydantic model a field holds when it is a config section, else None."""
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def config_keys(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config model, sections and values, in definition order."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        section = _section_model(field)
        if section is not None:
            keys += config_keys(section, f"{prefix}{name}.")
    return keys


def suggest_key(dotted: str) -> str:
    """' (did you mean 'x'?)' for an unknown dotted key when a known one is close (difflib), else ''."""
    keys = config_keys()
    guesses = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    leaf = dotted.rsplit(".", 1)[-1]
    guesses += [key for key in keys if key.rsplit(".", 1)[-1] == leaf and key not in guesses]
    if not guesses:
        return ""
    return " (did you mean " + " or ".join(f"'{key}'" for key in guesses[:3]) + "?)"


def _set_dotted(tree: dict[str, Any], model: type[BaseModel], dotted: str, value: Any) -> None:
    """Set tree[a][b][c] = value for 'a.b.c', refusing keys the models do not define."""
    parts = dotted.split(".")
    node, current = tree, model
    for depth, part in enumerate(parts):
        fields = current.model_fields if current is not None else None
        if fields is not None and part not in fields:
            key = ".".join(parts[: depth + 1])
            hint = suggest_key(key) or f" (known here: {', '.join(sorted(fields))})"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        current = _section_model(fields[part]) if fields is not None else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = child


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'a.b=value' into the dotted key and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML ({' '.join(str(err).split())})") from None
    return key, value


def _format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the dotted key."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"])
        if not key:  # a model validator's message names its keys itself; the input would be the whole config
            lines.append(str(problem["msg"]).removeprefix("Value error, "))
        elif problem["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'{suggest_key(key)}")
        elif isinstance(problem.get("input"), dict):  # a section's own validator: its message says what is wrong
            lines.append(f"config key '{key}': {str(problem['msg']).removeprefix('Value error, ')}")
        else:
            lines.append(f"config key '{key}': {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(lines)


def build_config(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Validate a config tree after applying dotted overrides; errors name the key."""
    tree = dict(tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, JobConfig, key, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping of `node`; a ConstructorError names a repeated key and both of its lines."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {seen[key]} and {line})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> Any:
    """The YAML document of a config file, refusing duplicate keys; a ConfigError names the file and the key."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a YAML preset (a path, or a name under configs/) and apply `key=value` overrides."""
    path = resolve_preset(path)
    tree = load_yaml(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(tree).__name__}")
    tree.setdefault("name", path.stem)
    return build_config(tree, overrides)


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def resolve_preset(path: str | Path) -> Path:
    """A config path as given, or a preset name such as 'test-tiny' looked up in configs/."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    for name in (str(path), f"{path}.yaml"):
        preset = CONFIGS_DIR / name
        if preset.is_file():
            return preset
    raise ConfigError(f"config file not found: {path} (presets: {', '.join(sorted(p.stem for p in CONFIGS_DIR.glob('*.yaml')))})")


def _type_name(annotation: Any) -> str:
    """A field's type as a user reads it: 'int', 'float | None', 'one of: k1, k3', 'list[str]'."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of: " + ", ".join(str(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "<="),
           (annotated_types.Lt, "lt", "<"))


def field_type(field: FieldInfo) -> str:
    """The type of a field with its bounds, e.g. 'float > 0, <= 1' or 'int >= 1 | None'."""
    bounds = [f"{symbol} {getattr(item, attribute)}" for item in field.metadata
              for kind, attribute, symbol in _BOUNDS if isinstance(item, kind)]
    options = [field.annotation]
    if typing.get_origin(field.annotation) in (typing.Union, types.UnionType):
        options = list(typing.get_args(field.annotation))
    name = " | ".join(_type_name(arg) for arg in options if arg is not type(None))
    optional = type(None) in options
    return name + (" " + ", ".join(bounds) if bounds else "") + (" | None" if optional else "")


def _first_line(model: type[BaseModel]) -> str:
    """The first line of a model's docstring."""
    return next(iter((model.__doc__ or "").strip().splitlines()), "")


def explain_config(config: BaseModel, prefix: str = "") -> str:
    """Every field of a config as 'dotted.key = value  (type; default ...)' plus its description, by section."""
    lines: list[str] = []
    sections: list[tuple[str, BaseModel]] = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            sections.append((name, value))
            continue
        shown = json.dumps(_json_safe(value))
        default = field.get_default(call_default_factory=True)
        note = field_type(field) + ("" if value == default else f"; default {json.dumps(_json_safe(default))}")
        lines.append(f"{prefix}{name} = {shown}  ({note})")
        lines += textwrap.wrap(field.description or "", width=100, initial_indent="    ", subsequent_indent="    ")
    for name, value in sections:
        lines.append("")
        lines.append(f"[{prefix}{name}] {_first_line(type(value))}")
        lines.append(explain_config(value, f"{prefix}{name}."))
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """A field value as JSON sees it (tuples become lists, models such as hardware.nodes' groups dicts)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return [_json_safe(item) for item in value] if isinstance(value, list | tuple) else value


def sections_help() -> str:
    """The config sections with their one-line descriptions, for the --help of commands that take a config."""
    top = [name for name, field in JobConfig.model_fields.items() if _section_model(field) is None]
    rows = [(", ".join(top), "top-level values")]
    rows += [(name, _first_line(section)) for name, field in JobConfig.model_fields.items()
             if (section := _section_model(field)) is not None]
    width = max(len(name) for name, _ in rows)
    presets = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    return "\n".join([
        "configuration: a preset or YAML file, then dotted key=value overrides (e.g. learner.lr=5e-7); sections:",
        *(f"  {name:<{width}}  {text}" for name, text in rows),
        f"presets: {presets}",
        "every key with its description, type and value: research config PRESET --explain",
    ])


def looks_local(name_or_path: str) -> bool:
    """Whether a model reference names a local directory rather than a hub id ('org/name') or a built-in name:
    an absolute, ~ or ./ path, more than one '/', or an 'a/b' whose 'a' is a directory here."""
    if name_or_path.startswith(("/", "~", "./", "../")) or name_or_path.count("/") > 1:
        return True
    head = name_or_path.split("/", 1)[0]
    return "/" in name_or_path and Path(head).is_dir()


def check_paths(config: JobConfig, data: bool = True) -> None:
    """Refuse, before anything starts, what the config names that this machine lacks: data files, index_dir, a
    local policy or tokenizer directory, the wandb package when logging.wandb_project is set."""
    paths = [("data.train_files", f) for f in config.data.train_files] if data else []
    paths += [("data.val_files", f) for f in config.data.val_files] if data else []
    for key, path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"config key '{key}': no such file {path}")
    if config.retrieval.index_dir and not Path(config.retrieval.index_dir).is_dir():
        raise ConfigError(f"config key 'retrieval.index_dir': no such directory {config.retrieval.index_dir}")
    policy = config.policy
    if looks_local(policy.name_or_path) and not (Path(policy.name_or_path).expanduser() / "config.json").is_file():
        raise ConfigError(f"config key 'policy.name_or_path': {policy.name_or_path} is a local path but holds no "
                          "model (no config.json there); a hub id is written org/name")
    if policy.tokenizer and looks_local(policy.tokenizer) and not Path(policy.tokenizer).expanduser().is_dir():
        raise ConfigError(f"config key 'policy.tokenizer': no such directory {policy.tokenizer}")
    if config.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        # Checked here: the metrics logger imports wandb only after every engine and rank has started.
        raise ConfigError(f"config key 'logging.wandb_project' is {config.logging.wandb_project!r} but wandb is not "
                          "installed: pip install -e '.[wandb]', or unset the key")
