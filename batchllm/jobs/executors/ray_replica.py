"""The Ray side of the Ray executor: importing and connecting to Ray, each replica's resources,
and the actor that runs one engine replica (the driver side is ray_executor.py).

An actor runs the same replica loop as a worker process (worker.serve_replica: its engine, the
JobExecutor over the units it is handed, its own commits), in a thread of the actor; the driver
talks to it through two in-actor queues instead of a pipe:

    driver ── answer(AssignUnit | NoUnit | Stop) ──► inbox ──► the replica's WantUnit waits here
    driver ◄── take(timeout): [WantUnit, UnitDone, Progress, ..., Finished | Stopped | Failed] ── outbox
    driver ── stop(signum) ──► the replica stops admitting rows, commits, reports Stopped
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from batchllm.jobs.errors import JobSpecError
from batchllm.jobs.executor import StopSignal
from batchllm.jobs.executors.messages import Stop, ToDriver, ToReplica, WantUnit
from batchllm.jobs.executors.worker import WorkerSetup, serve_replica
from batchllm.jobs.spec import JobSpec

INSTALL_HINT = 'pip install "batchllm[ray]"'


def import_ray(where: str) -> ModuleType:
    """The ray module, or a JobSpecError (exit 2) that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise JobSpecError(f"{where}: engine.executor: ray needs Ray, which cannot be imported "
                           f"here ({e}). Install it with: {INSTALL_HINT} (or pip install "
                           "'ray>=2.9'), or run with engine.executor: local") from None
    return ray


def connect(ray: ModuleType, address: str, where: str) -> bool:
    """Join the cluster at `address` unless this process already did; True when we joined (and
    so leave it again at the end). `auto`: RAY_ADDRESS or the cluster started on this machine;
    `local`: start a one-machine cluster inside this process."""
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobSpecError(
            f"{where}: cannot reach a Ray cluster at ray.address={address!r}: {first}. Start one "
            "(`ray start --head` on this machine) or name it (ray.address: <head>:6379, or "
            "RAY_ADDRESS), or set ray.address: local to run on this machine only") from None
    return True


@dataclass(slots=True)
class ReplicaShape:
    """How many replicas to start and what one of them takes from the cluster."""

    count: int
    num_cpus: float
    num_gpus: int  # 0: a CPU replica
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def bundle(self) -> dict[str, float]:
        """The placement-group bundle of one replica (its GPUs on one node)."""
        b = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        return {k: v for k, v in b.items() if v}

    def describe(self) -> str:
        return ", ".join(f"{k}: {v:g}" for k, v in self.bundle.items()) or "nothing"


def replica_shape(spec: JobSpec, cluster: dict[str, float]) -> ReplicaShape:
    """Replicas of tensor_parallel_size GPUs each when the cluster has GPUs (and engine.device is
    not cpu), else CPU replicas; engine.data_parallel_size: auto = as many as the cluster holds."""
    where = spec.source or "job"
    tp = int(spec.engine.get("tensor_parallel_size", 1) or 1)
    device = str(spec.engine.get("device", "auto"))
    gpus = int(cluster.get("GPU", 0))
    if device == "cuda" and gpus == 0:
        raise JobSpecError(f"{where}: engine.device: cuda, but the Ray cluster has no GPU (its "
                           f"resources: {_resources(cluster)}); use device: auto or cpu")
    per = tp if device != "cpu" and gpus > 0 else 0
    cpus = float(spec.ray.num_cpus)
    n = spec.data_parallel_size
    if n == "auto":
        n = max(1, gpus // per) if per else max(1, int(cluster.get("CPU", 1) // max(cpus, 1.0)))
    return ReplicaShape(int(n), cpus, per, dict(spec.ray.resources))


def _resources(cluster: dict[str, float]) -> str:
    shown = {k: v for k, v in cluster.items() if not k.startswith(("node:", "memory",
                                                                    "object_store_memory"))}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "none"


def describe_cluster(ray: ModuleType) -> str:
    """What the cluster has in all and free now, for messages."""
    try:
        return (f"it has {_resources(ray.cluster_resources())} in all, "
                f"{_resources(ray.available_resources())} free")
    except Exception:  # noqa: BLE001 - only for a message
        return "its resources could not be read"


def check_ray(spec: JobSpec) -> ModuleType | None:
    """Before anything loads: Ray is importable when the job asks for it (else exit 2)."""
    return import_ray(spec.source or "job") if spec.executor == "ray" else None


def wait_ready(ray: ModuleType, refs: list[Any], timeout: float, stop: StopSignal) -> list[bool]:
    """Wait for `refs` (up to `timeout`, stopping early on a signal); which are ready."""
    deadline, pending = time.monotonic() + timeout, list(refs)
    while pending and time.monotonic() < deadline and not stop.requested:
        _, pending = ray.wait(pending, num_returns=len(pending),
                              timeout=min(0.5, max(0.0, deadline - time.monotonic())))
    return [ref not in pending for ref in refs]


def reserve(ray: ModuleType, shape: ReplicaShape, timeout: float, stop: StopSignal,
            where: str) -> list[Any]:
    """One placement group per replica (its bundle on one node); those the cluster places within
    `timeout`. None placed: a JobSpecError saying what the cluster has."""
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = [placement_group([shape.bundle], strategy="STRICT_PACK") for _ in range(shape.count)]
    ready = wait_ready(ray, [g.ready() for g in groups], timeout, stop)
    for g, ok in zip(groups, ready):
        if not ok:
            remove_placement_group(g)
    placed = [g for g, ok in zip(groups, ready) if ok]
    if not placed and not stop.requested:
        raise JobSpecError(
            f"{where}: the Ray cluster could not fit one engine replica ({shape.describe()}) "
            f"within {timeout:g} s ({describe_cluster(ray)}). Lower engine.tensor_parallel_size "
            "or ray.num_cpus / ray.resources, add nodes, or raise ray.placement_timeout_s")
    return placed


def actor_options(shape: ReplicaShape, group: Any, name: str) -> dict[str, Any]:
    """A replica actor's options: its resources inside its placement group (and the TP ranks it
    starts with it), a threaded actor (the driver's calls meet its running loop), no restarts."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"name": name, "num_cpus": shape.num_cpus, "num_gpus": shape.num_gpus,
            "resources": shape.resources or None, "max_concurrency": 4, "max_restarts": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def cause(e: BaseException) -> str:
    """A Ray error in one line: Ray's messages carry the remote traceback; its last line is the
    error itself."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    tail = lines[-1].strip() if lines else type(e).__name__
    return f"{type(e).__name__}: {tail[:300]}"


class _ActorLink:
    """The replica's end (worker.ReplicaLink) inside the actor: queues the driver polls and fills."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[ToReplica] = queue.Queue()
        self.outbox: queue.Queue[ToDriver] = queue.Queue()
        self.signum = 0

    def send(self, msg: ToDriver) -> None:
        self.outbox.put(msg)

    def ask(self, block: bool) -> ToReplica:
        self.send(WantUnit(block))
        while True:  # every ask is answered; a stop asked meanwhile must not wait for it
            try:
                return self.inbox.get(timeout=0.5)
            except queue.Empty:
                if self.signum:
                    return Stop()

    def stop_requested(self) -> int:
        return self.signum


class ReplicaActor:
    """One engine replica (a Ray actor: ray.remote is applied by the driver, with the replica's
    resources and placement group). Its methods are called concurrently (a threaded actor)."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.link = _ActorLink()
        self.thread: threading.Thread | None = None

    def start(self) -> dict[str, Any]:
        """Start the replica loop (the engine loads in the background); where it runs."""
        import ray

        if self.thread is None:
            self.thread = threading.Thread(target=serve_replica, args=(self.setup, self.link),
                                           name="batchllm-replica", daemon=True)
            self.thread.start()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "device": f"cuda:{','.join(gpus)}" if gpus else "cpu"}

    def take(self, timeout: float) -> list[ToDriver]:
        """What the replica said since the last take (waits up to `timeout` for a first word)."""
        out: list[ToDriver] = []
        try:
            out.append(self.link.outbox.get(timeout=timeout))
            while True:
                out.append(self.link.outbox.get_nowait())
        except queue.Empty:
            return out

    def answer(self, msg: ToReplica) -> None:
        self.link.inbox.put(msg)

    def stop(self, signum: int) -> None:
        self.link.signum = signum
