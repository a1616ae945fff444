"""Device mesh, shardings and multi-host plumbing: the one place that places data on devices.

One mesh axis, "data": batches are split over it, parameters (the frozen backbone and the small
learnable prompts) are replicated. Multi-host runs use JAX's multi-controller runtime: each host
feeds its rows of the global batch and `jax.make_array_from_process_local_data` stitches them.
"""

from __future__ import annotations

import hashlib
import logging

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize(cfg: ml_collections.ConfigDict) -> None:
    """Starts `jax.distributed` for a multi-process run (`parallel.multihost`).

    Empty / negative fields are left to JAX's auto-detection (TPU VMs, SLURM, ...). A coordinator
    that cannot be reached fails after `initialization_timeout` seconds, and a process whose peer
    died stops after `heartbeat_timeout` seconds, instead of hanging.
    """
    if not cfg.multihost or jax.distributed.is_initialized():
        return
    kwargs = {"initialization_timeout": int(cfg.initialization_timeout),
              "heartbeat_timeout_seconds": int(cfg.heartbeat_timeout)}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kwargs["num_processes"] = int(cfg.num_processes)
    if cfg.process_id >= 0:
        kwargs["process_id"] = int(cfg.process_id)
    # Cross-process collectives of the CPU backend (tests, CPU clusters); no effect on GPU/TPU.
    # Set before anything touches a device: the backends are created by the first such call.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # If the peers never come, the JAX runtime aborts the process after the timeout with
    # DEADLINE_EXCEEDED (it cannot be caught); this line says what was being waited for.
    logging.warning("jax.distributed.initialize: joining coordinator %s (%s processes, timeout "
                    "%d s)", kwargs.get("coordinator_address", "auto-detected"),
                    kwargs.get("num_processes", "auto"), kwargs["initialization_timeout"])
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:
        raise RuntimeError(
            f"jax.distributed.initialize({kwargs}) failed: {err}. Check that the coordinator "
            "address is reachable from every process and that all processes were started."
        ) from err
    logging.info(
        "process %d of %d, %d local / %d global devices", jax.process_index(),
        jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def make_mesh(num_devices: int = 0) -> Mesh:
    """The first `num_devices` devices (0 = all devices of all hosts) on the "data" axis."""
    devices = jax.devices()
    if num_devices:
        if not 0 < num_devices <= len(devices) or jax.process_count() > 1:
            raise ValueError(
                f"parallel.num_devices={num_devices}: expected 0 (all) or 1..{len(devices)} in a "
                f"single-process run, got it with {len(devices)} devices and "
                f"{jax.process_count()} process(es)"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def setup(cfg: ml_collections.ConfigDict) -> Mesh:
    """`initialize` then the mesh of `parallel.num_devices` (0 = all devices)."""
    initialize(cfg)
    return make_mesh(cfg.num_devices)


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Arrays whose `axis` is the batch, split over "data"."""
    return NamedSharding(mesh, PartitionSpec(*(None,) * axis, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    if batch_size % mesh.size:
        raise ValueError(
            f"{field}={batch_size} must be a multiple of the number of devices ({mesh.size})"
        )


def replicate(tree, mesh: Mesh):
    """Places a host pytree (identical on every host) on every device of the mesh."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def distribute(full: np.ndarray, mesh: Mesh, axis: int = 0) -> jax.Array:
    """An array every host holds whole -> one global array split over "data" on `axis`."""
    return jax.make_array_from_callback(full.shape, batch_sharding(mesh, axis),
                                        lambda index: full[index])


def global_array(local: np.ndarray, mesh: Mesh, axis: int = 0) -> jax.Array:
    """This host's rows (batch on `axis`) -> one global array sharded on "data"."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, axis), local)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """This host's rows (numeric arrays only) -> global arrays sharded on "data"."""
    return {
        key: global_array(value, mesh)
        for key, value in local.items()
        if isinstance(value, np.ndarray) and value.dtype != object
    }


def all_processes(flag: bool) -> bool:
    """True when `flag` holds on every process: the same answer everywhere, so that processes
    taking a branch that launches device computations stay in lockstep."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def sync(name: str) -> None:
    """Barrier over all processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_same_on_all_processes(name: str, value: str) -> None:
    """Stops a multi-process run whose processes disagree (config, dataset) before any training:
    each process hashes `value` and all hashes must agree."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int64)
    digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
    differing = [i for i, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise ValueError(
            f"processes disagree on the {name}: processes {differing} differ from process 0; "
            "start every process with the same config and data"
        )


def host_local(tree):
    """Global batch-sharded arrays -> numpy arrays of this host's rows (in row order)."""
    def local(x: jax.Array) -> np.ndarray:
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.global_array_to_host_local_array(
            x, x.sharding.mesh, x.sharding.spec))

    return jax.tree_util.tree_map(local, tree)


def gather(tree):
    """Global arrays -> full numpy arrays on every host (all rows of every host)."""
    def full(x: jax.Array) -> np.ndarray:
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(full, tree)
