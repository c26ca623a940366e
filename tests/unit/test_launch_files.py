"""The cluster launch files parse and point at configs and entry points that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from cluster.config import load_config

LAUNCH = Path(__file__).resolve().parents[2] / "cluster" / "launch"


def test_rayjob_entrypoint_names_a_loadable_config() -> None:
    job = yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:3] == ["python", "-m", "cluster.train"]
    config = load_config(entrypoint[3], entrypoint[4:])
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = workers["replicas"] * int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    needed = config.rollout.num_actors * config.rollout.gpus_per_actor + config.learner.world_size * config.learner.gpus_per_rank
    assert gpus >= needed


def test_ray_cluster_yaml_and_slurm_script() -> None:
    cluster = yaml.safe_load((LAUNCH / "ray-cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    script = (LAUNCH / "slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0
    assert re.search(r"ray\" job submit .* -m cluster.train", script.replace("\\\n", " "))
    load_config(re.search(r"CONFIG=\$\{1:-(\S+)\}", script).group(1))
