"""Data parallelism over every device of every process with ``jax.sharding``.

One mesh axis, ``data``, spans all devices (process by process, so each
process's devices hold a contiguous block of the global batch). Batches are
split along their batch axis; the train state is replicated. The same code
runs on one CPU, on eight fake CPU devices, on a GPU box or on a TPU slice
with many hosts: XLA inserts the gradient all-reduce.
See ``cnnflat_jax.data.shards`` for which examples each process loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnflat_jax.errors import Error

AXIS = "data"


def initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    peer_timeout_sec: int = 100,
) -> None:
    """Starts JAX's multi-controller runtime when running as several processes.

    With no arguments and none of ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` set, this does nothing (one
    process). ``auto`` as the address calls ``jax.distributed.initialize()``
    with no arguments, which finds the cluster itself on Cloud TPU, Slurm and
    Open MPI. On CPU the processes talk through gloo collectives. A process
    not heard from for ``peer_timeout_sec`` counts as lost, and the others
    stop (JAX's heartbeat timeout).
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count = num_processes or _environment_int("JAX_NUM_PROCESSES", 0)
    index = process_id if process_id >= 0 else _environment_int("JAX_PROCESS_ID", -1)
    if not address and not count:
        return
    if address != "auto":
        _check_processes(address, count, index)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=peer_timeout_sec)
    else:
        jax.distributed.initialize(
            address, num_processes=count, process_id=index,
            heartbeat_timeout_seconds=peer_timeout_sec,
        )  # fmt: skip
    logging.info(
        "Process %d of %d, %d local of %d devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip


def device_count(num_devices: int, devices: Sequence | None = None) -> int:
    """The devices a run uses: ``num_devices``, or all of ``devices`` (this run's,
    ``jax.devices()``, by default) when it is 0."""
    return num_devices or len(jax.devices() if devices is None else devices)


def data_shards(config: Any) -> int:
    """How many shards a run's data is cut into: ``config.data_shards``, or one
    per process when it is 0 (``cnnflat_jax.data.shards``)."""
    return config.data_shards or jax.process_count()


class ProcessesError(Error, ValueError):
    """The coordinator address, process count or process id cannot start a run."""


def _environment_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise ProcessesError(f"${name}={text}: not an integer") from None


def _check_processes(address: str, count: int, index: int) -> None:
    """One line for a multi-process start that cannot work, before JAX tries it."""
    if not address or count < 1 or index < 0:
        raise ProcessesError(
            "a multi-process run needs a coordinator address (HOST:PORT), the process count "
            f"(>= 1) and this process's id (0 to count - 1); got --coordinator_address={address!r} "
            f"--num_processes={count} --process_id={index}"
        )
    if index >= count:
        raise ProcessesError(
            f"--process_id={index}: not one of the {count} processes' ids (0 to {count - 1})"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProcessesError(
            f"--coordinator_address={address}: not HOST:PORT (a port from 1 to 65535)"
        )


def data_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` (0: all), ordered by process."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices[: device_count(num_devices, devices)]), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Copies ``tree`` onto every device of ``mesh``; each process holds the same values."""
    target = replicated(mesh)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    return jax.tree.map(put, tree)


def batch_sharding(mesh: Mesh, batch_axis: int) -> NamedSharding:
    """Splits axis ``batch_axis`` over the ``data`` axis; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), AXIS))


def global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assembles each process's block of a batch-sharded array into one global array."""
    return jax.make_array_from_process_local_data(sharding, local)
