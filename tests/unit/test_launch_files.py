"""The cluster launch files fit the presets that name them: every learner rank, rollout actor and retrieval replica
finds a node (GPUs, CPUs, memory, custom resources), the GPUs are the ones the presets plan for, the job runs the
venv's interpreter with Ray token auth on, and large data lives on shared storage instead of being copied."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.config import JobConfig, load_config
from cluster.placement import (
    INSTANCE_TYPES,
    Node,
    check_launch_file,
    job_units,
    launch_nodes,
    place,
    slurm_header,
    slurm_nodes,
)
from cluster.plan import WIKI18_PASSAGES, main

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "cluster" / "launch"
GPU_PRESETS = ["qwen2.5-7b-instruct", "qwen2.5-7b-base", "qwen2.5-32b-instruct"]
INDEX_BYTES = WIKI18_PASSAGES * 768 * 4  # the fp32 Flat E5 wiki-18 index the presets serve
PAIRS = [(preset, name) for preset in GPU_PRESETS for name in load_config(preset).hardware.launch_files]
RAYJOBS = sorted(LAUNCH.glob("rayjob*.yaml"))


def demand(config: JobConfig) -> dict[str, float]:
    """Resource -> units the whole job asks for (GPUs and custom resources), counted without any packing."""
    needed: dict[str, float] = {}
    for unit in job_units(config, INDEX_BYTES):
        for name, units in {"GPU": unit.gpus, **unit.resources}.items():
            needed[name] = needed.get(name, 0) + units
    return needed


def offered(nodes: list[Node]) -> dict[str, float]:
    """Resource -> units all nodes advertise together."""
    total: dict[str, float] = {}
    for node in nodes:
        for name, units in {"GPU": node.gpus, **node.resources}.items():
            total[name] = total.get(name, 0) + units
    return total


def test_every_launch_file_is_named_by_a_preset() -> None:
    named = {name for _, name in PAIRS}
    files = {f"cluster/launch/{p.name}" for p in LAUNCH.iterdir() if p.suffix in (".yaml", ".sbatch")}
    assert files == named, "a launch file no preset names is a pair nothing checks"


@pytest.mark.parametrize(("preset", "name"), PAIRS)
def test_each_preset_fits_each_launch_file_it_names(preset: str, name: str) -> None:
    config = load_config(preset)
    verdict = check_launch_file(config, name, INDEX_BYTES)
    assert verdict.fits, verdict.problems
    hosted = {role: sum(roles.get(role, 0) for roles in verdict.hosted.values())
              for role in ("learner rank", "rollout actor", "retrieval replica")}
    assert hosted == {"learner rank": config.learner.world_size, "rollout actor": config.rollout.num_actors,
                      "retrieval replica": config.retrieval.replicas}
    if not name.endswith(".sbatch"):  # the Slurm script's node count is sbatch's --nodes, found by the planner
        nodes = launch_nodes(REPO / name)
        # Independently of the packing: the totals cover the demand, and nothing of the job's is on the head.
        assert all(offered(nodes).get(k, 0) >= v for k, v in demand(config).items())
        assert not any(node.resources for node in nodes if node.head)


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_hardware_sections_agree_with_the_launch_files(preset: str) -> None:
    config = load_config(preset)
    for name in config.hardware.launch_files:
        if name.endswith(".sbatch"):
            continue
        gpu_nodes = [node for node in launch_nodes(REPO / name) if node.gpus]
        assert gpu_nodes
        for node in gpu_nodes:
            instance = INSTANCE_TYPES[node.instance_type]
            assert instance.gpu_memory_gib == config.hardware.gpu_memory_gib
            assert instance.memory_gib == config.hardware.host_memory_gib
            assert node.instance_type in config.hardware.gpu and instance.gpu in config.hardware.gpu
    # A memory plan for other GPUs than the files start is refused, and `research plan` exits 1 on it.
    forty = load_config(preset, ["hardware.gpu_memory_gib=40"])
    verdict = check_launch_file(forty, config.hardware.launch_files[0], INDEX_BYTES)
    assert not verdict.fits and "80 GiB GPUs; hardware.gpu_memory_gib says 40" in verdict.problems[-1]


def test_a_launch_file_too_small_for_a_preset_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config("qwen2.5-32b-instruct")
    verdict = check_launch_file(config, "cluster/launch/rayjob.yaml", INDEX_BYTES)
    assert not verdict.fits
    assert any(p.startswith("8 of 16 learner ranks (1 GPU, 8 CPU, learner_node 1)") for p in verdict.problems)
    assert any(p.startswith("2 of 4 rollout actors (4 GPU, 8 CPU, rollout_node 1)") for p in verdict.problems)
    assert main(["qwen2.5-32b-instruct", "--launch", "cluster/launch/rayjob.yaml"]) == 1
    assert "8 of 16 learner ranks" in capsys.readouterr().out


def test_placement_respects_memory_and_the_head() -> None:
    config = load_config("qwen2.5-7b-instruct")
    replica = [u for u in job_units(config, INDEX_BYTES) if u.role == "retrieval replica"]
    small = Node("small", 64, 0, 40 * 2**30, {"retrieval_node": 1})
    assert not place(replica, [Node("head", 64, 0, None, {}, head=True), small], "x").fits  # index > memory
    big_head = Node("head", 64, 0, 512 * 2**30, {"retrieval_node": 1}, head=True)
    assert not place(replica, [big_head, small], "x").fits  # off the head of a multi-node cluster
    assert place(replica, [big_head], "x").fits  # a one-node cluster allows it


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_runs_the_image_venv_with_token_auth_on_shared_storage(path: Path) -> None:
    job = yaml.safe_load(path.read_text())
    assert job["kind"] == "RayJob"
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    dockerfile = (LAUNCH / "Dockerfile").read_text()
    venv = re.search(r"^ENV VIRTUAL_ENV=(\S+)", dockerfile, re.MULTILINE).group(1)
    assert re.search(rf"^ENV PATH={re.escape(venv)}/bin:\$PATH", dockerfile, re.MULTILINE)  # `ray start` is the venv's
    assert entrypoint[:3] == [f"{venv}/bin/python", "-m", "cluster.train"]
    assert "/" not in entrypoint[3] or entrypoint[3].startswith("/")  # the driver's cwd is Ray's, not the checkout
    config = load_config(entrypoint[3], entrypoint[4:])
    assert f"cluster/launch/{path.name}" in config.hardware.launch_files
    assert config.run_dir and config.run_dir.startswith("/shared/")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    tag = re.search(r"-t (\S+)", dockerfile).group(1)
    for group in groups:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == tag  # the image the Dockerfile builds
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
    for path_ in [config.retrieval.index_dir, *config.data.train_files, *config.data.val_files]:
        assert path_.startswith("/shared/")


def test_ray_cluster_yaml_uses_the_venv_token_auth_and_shared_storage() -> None:
    text = (LAUNCH / "ray-cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert cluster["max_workers"] >= sum(t.get("max_workers", 0) for t in cluster["available_node_types"].values()
                                         if t is not cluster["available_node_types"][cluster["head_node_type"]])
    venv = "~/research-rl/.venv"
    assert any("python3 -m venv .venv" in c and "research-rl" in c for c in cluster["setup_commands"])
    for command in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        words = shlex.split(command)
        ray = [w for w in words if w.endswith("/ray") or w == "ray"]
        assert ray == [f"{venv}/bin/ray"], command  # never a bare `ray` from whatever PATH has
        assert "RAY_AUTH_MODE=token" in words
    # Only the auth token is copied to the nodes; the index and data live on /shared, mounted on every node.
    assert list(cluster["file_mounts"]) == ["~/.ray/auth_token"]
    assert any("/shared" in c and "mount" in c for c in cluster["initialization_commands"])
    # The documented submit command runs the venv's interpreter (the job runner activates no venv).
    submit = " ".join(line.lstrip("# ").rstrip("\\ ") for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"ray job submit .* -- /home/ubuntu/research-rl/\.venv/bin/python -m cluster\.train", submit)
    assert cluster["auth"]["ssh_user"] == "ubuntu"


STUB_SRUN = """#!/bin/bash
# srun --nodes=1 --ntasks=1 -w NODE CMD...: run CMD as if on NODE
while [ "$1" != "-w" ]; do shift; done
node=$2; shift 2
if [ "$1" = hostname ]; then echo "10.0.0.${node#node}"; exit 0; fi
FAKE_NODE=$node exec "$@"
"""
STUB_RAY = """#!/bin/bash
# one write per call (calls from background sruns interleave otherwise); %q keeps each argument's quoting
line=$(printf '%s\\t%s\\t' "${FAKE_NODE:-driver}" "$RAY_AUTH_MODE"; printf '%q ' "$@")
echo "$line" >> "$LAUNCH_LOG"
"""


def run_slurm_script(tmp_path: Path, count: int, *args: str) -> list[tuple[str, str, list[str]]]:
    """Run cluster/launch/slurm.sbatch on `count` pretend nodes: srun and scontrol are stubs, and so is the venv's
    `ray`, which records (node, RAY_AUTH_MODE, argv) of every call."""
    stubs, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stubs.mkdir()
    for path, text in ((stubs / "srun", STUB_SRUN), (venv / "bin" / "ray", STUB_RAY),
                       (stubs / "scontrol", 'for i in $(seq 0 $((FAKE_COUNT - 1))); do echo node$i; done\n')):
        path.write_text(text if text.startswith("#!") else "#!/bin/bash\n" + text)
        path.chmod(0o755)
    log = tmp_path / "calls.tsv"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "VENV": str(venv), "HOME": str(tmp_path),
           "SLURM_JOB_NODELIST": "node[0-9]", "SLURM_JOB_ID": "7", "FAKE_COUNT": str(count), "LAUNCH_LOG": str(log),
           "RAY_START_WAIT_S": "0"}
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [(node, mode, shlex.split(argv)) for node, mode, argv in
            (line.split("\t") for line in log.read_text().splitlines())]


@pytest.mark.parametrize(("preset", "count"), [("qwen2.5-7b-instruct", 2), ("qwen2.5-32b-instruct", 4)])
def test_slurm_script_starts_the_nodes_the_planner_models(tmp_path: Path, preset: str, count: int) -> None:
    config = load_config(preset)
    verdict = check_launch_file(config, "cluster/launch/slurm.sbatch", INDEX_BYTES)
    assert verdict.fits and verdict.note.startswith(f"sbatch --nodes={count}")
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0
    calls = run_slurm_script(tmp_path, count, f"configs/{preset}.yaml")
    assert all(mode == "token" for _, mode, _ in calls)  # every ray command runs with token auth
    starts = sorted(((node, argv) for node, _, argv in calls if argv[:1] == ["start"]), key=lambda c: int(c[0][4:]))
    assert [node for node, _ in starts] == [f"node{i}" for i in range(count)]
    assert "--head" in starts[0][1]

    def option(argv: list[str], name: str) -> str:
        return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))

    started = [Node("n", float(option(argv, "num-cpus")), float(option(argv, "num-gpus")), None,
                    json.loads(option(argv, "resources")), head="--head" in argv) for _, argv in starts]
    header = slurm_header(LAUNCH / "slurm.sbatch")
    modelled = slurm_nodes(count, int(header["gpus-per-node"]), int(header["cpus-per-task"]))
    assert [(n.cpus, n.gpus, n.resources, n.head) for n in started] == \
        [(n.cpus, n.gpus, n.resources, n.head) for n in modelled]
    assert place(job_units(config, INDEX_BYTES), started, "slurm").fits
    submit = next(argv for node, _, argv in calls if argv[:2] == ["job", "submit"])
    entry = submit[submit.index("--") + 1:]
    assert entry[:4] == [f"{tmp_path}/venv/bin/python", "-m", "cluster.train", f"configs/{preset}.yaml"]
    assert entry[4].startswith("run_dir=")


def test_ray_cluster_yaml_passes_the_launchers_own_validation() -> None:
    # What `ray up` runs before anything starts: defaults merged in, then Ray's JSON schema (extra keys refused).
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text()))
    validate_config(config)
    assert config["available_node_types"]["learner_worker"]["max_workers"] == 2


def test_dockerfile_installs_every_package_the_project_ships() -> None:
    import tomllib

    dockerfile = (LAUNCH / "Dockerfile").read_text()
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (pattern.rstrip("*") for pattern in include):
        assert re.search(rf"^COPY {package} {package}$", dockerfile, re.MULTILINE), package
    assert re.search(r"^COPY configs configs$", dockerfile, re.MULTILINE)  # the entrypoints name presets
    assert "pip install --no-cache-dir -e '.[gpu]'" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".cache", "runs"} <= set(ignored)  # the build context never carries a CPU venv or runs


@pytest.mark.parametrize("count", [1, 3])
def test_slurm_script_roles_match_the_model_on_other_node_counts(tmp_path: Path, count: int) -> None:
    calls = run_slurm_script(tmp_path, count)
    starts = sorted(((node, argv) for node, _, argv in calls if argv[:1] == ["start"]), key=lambda c: int(c[0][4:]))
    started = [json.loads(next(a.split("=", 1)[1] for a in argv if a.startswith("--resources="))) for _, argv in starts]
    assert started == [node.resources for node in slurm_nodes(count, 8, 64)]
