"""The cluster launch files parse, point at configs and entry points that exist, and provide what the configs ask:
GPUs, and a node group for every custom resource the placement names (learner, rollout, retrieval), none of them the
head's."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from cluster.config import JobConfig, load_config

LAUNCH = Path(__file__).resolve().parents[2] / "cluster" / "launch"
# GPU memory per instance type of AWS (the launcher's comments name it; p4d is the 40 GB A100, p4de the 80 GB one).
GPU_MEMORY_GB = {"p4d.24xlarge": 40, "p4de.24xlarge": 80, "p5.48xlarge": 80}


def placement(config: JobConfig) -> dict[str, float]:
    """Custom resource -> units the job needs at most (one unit per learner rank, rollout actor, replica)."""
    needed: dict[str, float] = {}
    for resources, count in ((config.learner.resources, config.learner.world_size),
                             (config.rollout.resources, config.rollout.num_actors),
                             (config.retrieval.resources, config.retrieval.replicas)):
        for name, units in resources.items():
            needed[name] = needed.get(name, 0) + units * count
    return needed


def kuberay_resources(params: dict) -> dict[str, float]:
    """The custom resources of KubeRay rayStartParams ('"{\\"name\\": n}"')."""
    raw = params.get("resources")
    return json.loads(raw.strip('"').replace('\\"', '"')) if raw else {}


def test_rayjob_entrypoint_names_a_loadable_config_and_provides_its_placement() -> None:
    job = yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:3] == ["python", "-m", "cluster.train"]
    config = load_config(entrypoint[3], entrypoint[4:])
    assert config.run_dir and config.run_dir.startswith("/checkpoints/")  # the volume every node mounts
    cluster = job["spec"]["rayClusterSpec"]
    groups = cluster["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in groups)
    needed = config.rollout.num_actors * config.rollout.gpus_per_actor + config.learner.world_size * config.learner.gpus_per_rank
    assert gpus >= needed
    offered: dict[str, float] = {}
    for g in groups:
        for name, units in kuberay_resources(g["rayStartParams"]).items():
            offered[name] = offered.get(name, 0) + units * g["replicas"]
    assert placement(config) and all(offered.get(name, 0) >= units for name, units in placement(config).items())
    assert not kuberay_resources(cluster["headGroupSpec"]["rayStartParams"])
    retrieval = [g for g in groups if "retrieval_node" in kuberay_resources(g["rayStartParams"])]
    limits = retrieval[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["memory"].removesuffix("Gi")) * 2**30 > 64.5e9  # the fp32 Flat wiki-18 index fits


def test_ray_cluster_yaml_gpu_names_and_placement() -> None:
    cluster = yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    for line in (LAUNCH / "ray-cluster.yaml").read_text().splitlines():
        instance = re.search(r"InstanceType:\s*(\S+)", line)
        memory = re.search(r"A100 (\d+) ?GB", line.split("#", 1)[-1]) if "#" in line else None
        if instance and memory:
            assert GPU_MEMORY_GB[instance.group(1)] == int(memory.group(1)), line
    config = load_config("qwen2.5-7b-instruct")
    types = cluster["available_node_types"]
    offered: dict[str, float] = {}
    for node in types.values():
        for resource, units in node.get("resources", {}).items():
            offered[resource] = offered.get(resource, 0) + units * node.get("max_workers", 1)
    assert all(offered.get(name, 0) >= units for name, units in placement(config).items())
    assert not types[cluster["head_node_type"]]["resources"]
    assert cluster["max_workers"] >= sum(node.get("min_workers", 0) for node in types.values())


def test_slurm_script() -> None:
    script = (LAUNCH / "slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0
    assert re.search(r"ray\" job submit .* -m cluster.train", script.replace("\\\n", " "))
    load_config(re.search(r"CONFIG=\$\{1:-(\S+)\}", script).group(1))
    for resource in placement(load_config("qwen2.5-7b-instruct")):
        assert resource in script  # the worker nodes advertise every resource the placement names
