"""Will the job be placed? Its learner ranks, rollout actors and retrieval replicas against the nodes a cluster offers.

Every unit of work asks Ray for what its config section names (learner.cpus_per_rank / gpus_per_rank / resources,
rollout.cpus_per_actor / gpus_per_actor / resources, retrieval.replica_cpus / replica_gpus / resources plus the host
memory of its index) and must fit on one node. The nodes come from a launch file under cluster/launch/ (a Ray cluster
launcher YAML, a KubeRay RayJob, the Slurm script) or from the config's `hardware.nodes`. Packing is best-fit
decreasing: exact for these sizes (a few node groups of identical nodes), and it errs towards "does not fit".

Pure arithmetic on YAML and text: nothing is started, and neither Ray nor torch is imported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from cluster.config import JobConfig

GIB = float(2**30)
REPO = Path(__file__).resolve().parents[1]
# Ray's default object store takes 30 % of a node's available memory, at most 200 GB (ray_constants
# DEFAULT_OBJECT_STORE_MEMORY_PROPORTION, DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES); the rest is its "memory" resource.
OBJECT_STORE_SHARE, OBJECT_STORE_CAP = 0.3, 200e9
MAX_SLURM_NODES = 64


@dataclass(frozen=True)
class InstanceType:
    """What a cloud instance type gives Ray: vCPUs, GPUs, RAM and the memory of one GPU."""

    cpus: int
    gpus: int
    memory_gib: float
    gpu_memory_gib: float | None = None
    gpu: str | None = None


# The instance types the launch files name (AWS's published specifications).
INSTANCE_TYPES: dict[str, InstanceType] = {
    "p4d.24xlarge": InstanceType(96, 8, 1152, 40, "A100-SXM4-40GB"),
    "p4de.24xlarge": InstanceType(96, 8, 1152, 80, "A100-SXM4-80GB"),
    "p5.48xlarge": InstanceType(192, 8, 2048, 80, "H100-SXM5-80GB"),
    "m6i.4xlarge": InstanceType(16, 0, 64),
    "r6i.8xlarge": InstanceType(32, 0, 256),
}


@dataclass(frozen=True)
class Node:
    """One node as Ray sees it: logical CPUs, GPUs, the memory resource (None = not stated), custom resources."""

    group: str
    cpus: float
    gpus: float
    memory: float | None  # bytes of Ray's memory resource
    resources: dict[str, float]
    head: bool = False
    gpu_memory_gib: float | None = None
    instance_type: str | None = None


@dataclass(frozen=True)
class Unit:
    """One actor (or placement-group bundle) of the job and what it asks Ray for."""

    role: str
    cpus: float
    gpus: float
    memory: float  # bytes
    resources: dict[str, float]
    off_head: bool = False

    def describe(self) -> str:
        """'2 GPU, 8 CPU, rollout_node 1' for messages."""
        parts = [f"{self.gpus:g} GPU"] if self.gpus else []
        parts.append(f"{self.cpus:g} CPU")
        if self.memory:
            parts.append(f"{self.memory / GIB:.1f} GiB memory")
        parts += [f"{name} {units:g}" for name, units in self.resources.items()]
        return ", ".join(parts)


@dataclass
class Placement:
    """The verdict for one source of nodes: whether every unit found a node, and what each node group hosts."""

    source: str
    fits: bool
    problems: list[str] = field(default_factory=list)
    hosted: dict[str, dict[str, int]] = field(default_factory=dict)  # node group -> role -> units
    nodes: int = 0
    gpus: float = 0.0
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The verdict as JSON."""
        out: dict[str, Any] = {"source": self.source, "fits": self.fits, "nodes": self.nodes, "gpus": self.gpus,
                               "hosted": self.hosted}
        if self.problems:
            out["problems"] = list(self.problems)
        if self.note:
            out["note"] = self.note
        return out


def ray_memory(ram_bytes: float) -> float:
    """Ray's default memory resource on a node of `ram_bytes` RAM: what the object store leaves."""
    return ram_bytes - min(OBJECT_STORE_SHARE * ram_bytes, OBJECT_STORE_CAP)


def job_units(config: JobConfig, index_bytes: float) -> list[Unit]:
    """Every unit the job asks Ray for: learner ranks, rollout actors, retrieval replicas (none with urls)."""
    learner, rollout, retrieval = config.learner, config.rollout, config.retrieval
    units = [Unit("learner rank", learner.cpus_per_rank, learner.gpus_per_rank, 0.0, dict(learner.resources))
             for _ in range(learner.world_size)]
    units += [Unit("rollout actor", rollout.cpus_per_actor, rollout.gpus_per_actor, 0.0, dict(rollout.resources))
              for _ in range(rollout.num_actors)]
    if not retrieval.urls:
        # A replica reserves the bytes of its index file (cluster.retrieval_replicas.replica_options) and stays off
        # the head of a multi-node cluster unless allow_head_node.
        units += [Unit("retrieval replica", retrieval.replica_cpus, retrieval.replica_gpus, index_bytes,
                       dict(retrieval.resources), off_head=not retrieval.allow_head_node)
                  for _ in range(retrieval.replicas)]
    return units


def place(units: list[Unit], nodes: list[Node], source: str) -> Placement:
    """Best-fit-decreasing placement of `units` on `nodes`; the Placement names every unit that found no node."""
    free = [{"CPU": n.cpus, "GPU": n.gpus, "memory": n.memory, **n.resources} for n in nodes]
    multi_node = len(nodes) > 1
    hosted: dict[str, dict[str, int]] = {}
    homeless: dict[tuple[str, str], int] = {}
    for unit in sorted(units, key=lambda u: (-u.gpus, -u.memory, -u.cpus)):
        best = None
        for index, (node, left) in enumerate(zip(nodes, free, strict=True)):
            if unit.off_head and multi_node and node.head:
                continue
            if left["CPU"] < unit.cpus or left["GPU"] < unit.gpus:
                continue
            if unit.memory and left["memory"] is not None and left["memory"] < unit.memory:
                continue
            if any(left.get(name, 0.0) < units_ for name, units_ in unit.resources.items()):
                continue
            if best is None or (left["GPU"], left["CPU"]) < (free[best]["GPU"], free[best]["CPU"]):
                best = index
        if best is None:
            key = (unit.role, unit.describe())
            homeless[key] = homeless.get(key, 0) + 1
            continue
        left = free[best]
        left["CPU"] -= unit.cpus
        left["GPU"] -= unit.gpus
        if unit.memory and left["memory"] is not None:
            left["memory"] -= unit.memory
        for name, units_ in unit.resources.items():
            left[name] -= units_
        group = hosted.setdefault(nodes[best].group, {})
        group[unit.role] = group.get(unit.role, 0) + 1
    counts: dict[str, int] = {}
    for unit in units:
        counts[unit.role] = counts.get(unit.role, 0) + 1
    problems = [f"{missing} of {counts[role]} {role}s ({needs}) find no node with room"
                for (role, needs), missing in homeless.items()]
    return Placement(source, not problems, problems, hosted, len(nodes), sum(n.gpus for n in nodes))


def _instance(node_config: dict[str, Any], where: str) -> tuple[str, InstanceType]:
    """The instance type a Ray launcher node type names, from INSTANCE_TYPES."""
    name = str(node_config.get("InstanceType", ""))
    if name not in INSTANCE_TYPES:
        raise ValueError(f"{where}: instance type {name or '(none)'} is not one the planner knows "
                         f"({', '.join(INSTANCE_TYPES)}); describe the nodes in hardware.nodes instead")
    return name, INSTANCE_TYPES[name]


def nodes_from_ray_cluster(path: Path) -> list[Node]:
    """The nodes of a Ray cluster launcher YAML at full scale: the head, and max_workers of each worker type."""
    spec = yaml.safe_load(path.read_text())
    nodes = []
    for name, node_type in spec["available_node_types"].items():
        instance_name, instance = _instance(node_type.get("node_config", {}), f"{path.name} {name}")
        head = name == spec["head_node_type"]
        stated = dict(node_type.get("resources") or {})
        cpus = float(stated.pop("CPU", instance.cpus))
        gpus = float(stated.pop("GPU", instance.gpus))
        memory = float(stated.pop("memory", ray_memory(instance.memory_gib * GIB)))
        count = 1 if head else int(node_type.get("max_workers", spec.get("max_workers", 0)))
        nodes += [Node(name, cpus, gpus, memory, stated, head, instance.gpu_memory_gib, instance_name)
                  for _ in range(count)]
    return nodes


_K8S_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def k8s_quantity(text: str | float) -> float:
    """A Kubernetes quantity ('64Gi', '500m', '8') as a number (bytes, cores)."""
    value = str(text)
    if value.endswith("m"):
        return float(value[:-1]) / 1000
    for suffix, scale in _K8S_UNITS.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def _kuberay_group(group: dict[str, Any], name: str, count: int, head: bool) -> list[Node]:
    """The nodes of one KubeRay group: rayStartParams override the container's limits, as KubeRay does."""
    params = group.get("rayStartParams") or {}
    pod = group["template"]["spec"]
    limits = pod["containers"][0].get("resources", {}).get("limits", {})
    cpus = float(params.get("num-cpus", k8s_quantity(limits.get("cpu", 0))))
    gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    memory = ray_memory(k8s_quantity(limits["memory"])) if "memory" in limits else None
    raw = params.get("resources")
    resources = json.loads(str(raw).strip().strip("'\"").replace('\\"', '"')) if raw else {}
    instance_name = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
    gpu_memory = INSTANCE_TYPES[instance_name].gpu_memory_gib if instance_name in INSTANCE_TYPES else None
    return [Node(name, cpus, gpus, memory, resources, head, gpu_memory, instance_name) for _ in range(count)]


def nodes_from_rayjob(path: Path) -> list[Node]:
    """The nodes of a KubeRay RayJob (or RayCluster): the head and each worker group's replicas (maxReplicas when
    the in-tree autoscaler is on)."""
    spec = yaml.safe_load(path.read_text())["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    nodes = _kuberay_group(cluster["headGroupSpec"], "head", 1, head=True)
    for group in cluster.get("workerGroupSpecs", []):
        count = int(group.get("maxReplicas" if autoscaling else "replicas", group.get("replicas", 1)))
        nodes += _kuberay_group(group, group["groupName"], count, head=False)
    return nodes


def slurm_header(path: Path) -> dict[str, str]:
    """The #SBATCH options of a Slurm script ('nodes' -> '2', 'gpus-per-node' -> '8', ...)."""
    options = {}
    for match in re.finditer(r"^#SBATCH\s+--([\w-]+)=(\S+)", path.read_text(), re.MULTILINE):
        options[match.group(1)] = match.group(2)
    return options


def slurm_nodes(count: int, gpus_per_node: int, cpus_per_node: int, learner_nodes: int | None = None,
                memory: float | None = None, gpu_memory_gib: float | None = None) -> list[Node]:
    """The Ray nodes cluster/launch/slurm.sbatch starts on `count` nodes (the same rule as the script): node 0 is the
    head; the first `learner_nodes` (default half, at least one) advertise learner_node, the others rollout_node,
    the last one also retrieval_node; a one-node allocation advertises all three."""
    learner_nodes = learner_nodes if learner_nodes is not None else max(1, count // 2)
    nodes = []
    for index in range(count):
        if count == 1:
            resources = {"learner_node": gpus_per_node, "rollout_node": gpus_per_node, "retrieval_node": 1}
        elif index < learner_nodes:
            resources = {"learner_node": gpus_per_node}
        else:
            resources = {"rollout_node": gpus_per_node}
            if index == count - 1:
                resources["retrieval_node"] = 1
        group = "all" if count == 1 else "learner" if index < learner_nodes else "rollout"
        nodes.append(Node(group, float(cpus_per_node), float(gpus_per_node), memory,
                          {k: float(v) for k, v in resources.items()}, head=index == 0, gpu_memory_gib=gpu_memory_gib))
    return nodes


def place_on_slurm(config: JobConfig, units: list[Unit], path: Path) -> Placement:
    """The smallest `sbatch --nodes=N` of the Slurm script on which the job is placed (GPU type: hardware)."""
    header = slurm_header(path)
    gpus, cpus = int(header.get("gpus-per-node", 8)), int(header.get("cpus-per-task", 1))
    host = config.hardware.host_memory_gib
    memory = ray_memory(host * GIB) if host else None
    source = str(_shown(path))
    for count in range(1, MAX_SLURM_NODES + 1):
        verdict = place(units, slurm_nodes(count, gpus, cpus, memory=memory), source)
        if verdict.fits:
            default = int(header.get("nodes", 1))
            verdict.note = f"sbatch --nodes={count}" + ("" if count == default else f" (the script's default is {default})")
            return verdict
    verdict.note = f"not even on {MAX_SLURM_NODES} nodes"
    return verdict


def _shown(path: Path) -> Path:
    """A path relative to the repository when it is inside it."""
    try:
        return path.resolve().relative_to(REPO)
    except ValueError:
        return path


def launch_nodes(path: Path) -> list[Node]:
    """The nodes a Ray cluster YAML or KubeRay file advertises."""
    try:
        text = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not YAML, so neither a Ray cluster launcher file nor a KubeRay one "
                         f"({' '.join(str(err).split())})") from None
    if isinstance(text, dict) and text.get("kind") in ("RayJob", "RayCluster"):
        return nodes_from_rayjob(path)
    if isinstance(text, dict) and "available_node_types" in text:
        return nodes_from_ray_cluster(path)
    raise ValueError(f"{path}: neither a Ray cluster launcher YAML nor a KubeRay RayJob/RayCluster")


def resolve_launch_file(name: str) -> Path:
    """A launch file as given, else relative to the repository (the presets name them that way)."""
    path = Path(name)
    if not path.is_file() and (REPO / name).is_file():
        path = REPO / name
    if not path.is_file():
        raise ValueError(f"launch file not found: {name}")
    return path


def check_launch_file(config: JobConfig, name: str, index_bytes: float) -> Placement:
    """Place the job on the nodes of one launch file; a GPU node whose GPU memory differs from
    hardware.gpu_memory_gib is a problem too (the memory plan would be for other GPUs)."""
    path = resolve_launch_file(name)
    units = job_units(config, index_bytes)
    if path.suffix == ".sbatch" or path.read_text().startswith("#!"):
        return place_on_slurm(config, units, path)
    nodes = launch_nodes(path)
    verdict = place(units, nodes, str(_shown(path)))
    stated = config.hardware.gpu_memory_gib
    for node in {n.group: n for n in nodes if n.gpus and n.gpu_memory_gib is not None}.values():
        if stated is not None and node.gpu_memory_gib != stated:
            verdict.fits = False
            verdict.problems.append(f"{node.group} nodes ({node.instance_type}) have {node.gpu_memory_gib:g} GiB GPUs; "
                                    f"hardware.gpu_memory_gib says {stated:g}")
    return verdict


def check_hardware_nodes(config: JobConfig, index_bytes: float) -> Placement:
    """Place the job on the node groups of hardware.nodes."""
    nodes = []
    for position, group in enumerate(config.hardware.nodes):
        memory = group.memory_gib if group.memory_gib is not None else config.hardware.host_memory_gib
        nodes += [Node(group.name or f"group{position}", group.cpus, group.gpus,
                       ray_memory(memory * GIB) if memory else None, dict(group.resources), group.head and i == 0,
                       config.hardware.gpu_memory_gib)
                  for i in range(group.count)]
    return place(job_units(config, index_bytes), nodes, "hardware.nodes")
