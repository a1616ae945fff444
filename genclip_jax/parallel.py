"""Device mesh, shardings and multi-host plumbing: the one place that places data on devices.

One mesh axis, "data": batches are split over it, parameters (the frozen backbone and the small
learnable prompts) are replicated. Multi-host runs use JAX's multi-controller runtime: each host
feeds its rows of the global batch and `jax.make_array_from_process_local_data` stitches them.
"""

from __future__ import annotations

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
    that cannot be reached fails after `initialization_timeout` seconds instead of hanging.
    """
    if not cfg.multihost or jax.distributed.is_initialized():
        return
    kwargs = {"initialization_timeout": int(cfg.initialization_timeout)}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kwargs["num_processes"] = int(cfg.num_processes)
    if cfg.process_id >= 0:
        kwargs["process_id"] = int(cfg.process_id)
    if jax.devices()[0].platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
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


def make_mesh() -> Mesh:
    """All devices of all hosts on the "data" axis."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


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


def global_batch(local: dict, mesh: Mesh) -> dict:
    """This host's rows (numeric arrays only) -> global arrays sharded on "data"."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in local.items()
        if isinstance(value, np.ndarray) and value.dtype != object
    }


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
