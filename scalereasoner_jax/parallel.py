"""Meshes, logical-axis rules and sharding.

Every parameter carries logical axis names (``logical_axes`` metadata on its ``nnx.Param``); one rules
table maps them onto the mesh axes ``data``, ``fsdp`` and ``tensor``. Activations are constrained the
same way through :func:`constrain`, which is a no-op outside a mesh, so the model code reads the same
on one CPU and on a pod. Training and sampling may use different tables (pass ``rules=``).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# FSDP over `fsdp`, Megatron-style tensor parallelism over `tensor`, batch over `data` x `fsdp`.
DEFAULT_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("patches", ("data", "fsdp")),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("vis_patch", None),
    ("vis_embed", "fsdp"),
    ("vis_mlp", "tensor"),
    ("vis_heads", "tensor"),
    ("vis_merge", "fsdp"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)

_active_rules: list[Rules] = [DEFAULT_RULES]


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Use another rules table (e.g. the sampler's) for activation constraints inside the block."""
    _active_rules.append(tuple(rules))
    try:
        yield
    finally:
        _active_rules.pop()


def current_rules() -> Rules:
    return _active_rules[-1]


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a (data, fsdp, tensor) mesh from e.g. ``{"data": 2, "fsdp": 2, "tensor": 2}``.

    One axis may be -1 (fill with the remaining devices); missing axes are 1.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; allowed: {list(MESH_AXES)}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by {known} for {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: {shape} needs {math.prod(sizes)} devices, have {len(devices)}")
    try:
        grid = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # CPU or uneven topologies: plain order is fine
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules | None = None) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
    if not axes:
        return PartitionSpec()
    table = dict(rules if rules is not None else current_rules())
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        target = table[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        free = tuple(t for t in targets if t not in used)
        used.update(free)
        out.append(None if not free else free[0] if len(free) == 1 else free)
    return PartitionSpec(*out)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (e.g. 4 KV heads on 8-way tensor)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept: list[str] = []
        for n in names:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[n]) == 0:
                kept.append(n)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def param_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    axes = var.get_metadata().get("logical_axes")
    spec = logical_to_spec(axes, rules)
    return NamedSharding(mesh, _fit_spec(spec, var.shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """NamedShardings for every variable of an (abstract or concrete) NNX state."""
    return jax.tree.map(
        lambda v: v.replace(param_sharding(v, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Place every parameter of ``model`` on ``mesh`` as its logical axes declare (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_value())),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    nnx.update(model, state)
    return model


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; does nothing without an active mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes)
    return jax.lax.with_sharding_constraint(x, _fit_spec(spec, x.shape, mesh))


# Set by ``scalereasoner-launch run`` on every TPU worker: join the pod even where the runtime does not
# advertise the other hosts in the environment (JAX then discovers them from the TPU metadata).
MULTIHOST_ENV = "SCALEREASONER_MULTIHOST"


def _multihost_tpu() -> bool:
    if os.environ.get(MULTIHOST_ENV, "") not in ("", "0"):
        return True
    # Runtimes that list the slice's hosts (GKE, some TPU VM images), or a multislice job.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize() -> None:
    """The one call programs make at start-up: join the other processes when running multi-host.

    * ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set (the local runner,
      ``scalereasoner-launch local``, or any cluster launched by hand): join that coordinator;
    * on a multi-host TPU slice (``SCALEREASONER_MULTIHOST=1``, set by ``scalereasoner-launch run``, or
      the runtime's host list): ``jax.distributed.initialize()`` discovers everything itself;
    * otherwise (one process) nothing. Calling it again is a no-op. Call it before any JAX computation.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif _multihost_tpu():
        jax.distributed.initialize()


def is_primary() -> bool:
    """Whether this process writes what must be written once (logs, exports, reports): process 0."""
    return jax.process_index() == 0


def replicated(value: Any, mesh: Mesh) -> Any:
    """A pytree of host values (the same on every process, e.g. a seed's key) as global arrays fully
    replicated over ``mesh``. Multi-host checkpoints and jitted steps need global arrays: a plain
    ``jnp.asarray`` lives on one local device, which Orbax cannot save from several hosts."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x: Any) -> Any:
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.device_get(jax.random.key_data(x)))
            return jax.random.wrap_key_data(
                jax.make_array_from_process_local_data(sharding, data), impl=jax.random.key_impl(x)
            )
        return jax.make_array_from_process_local_data(sharding, np.asarray(jax.device_get(x)))

    return jax.tree.map(put, value)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (any picklable value), in process order, on every process. Collective:
    all processes must call it the same number of times. One process: ``[obj]`` without copying."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = multihost_utils.process_allgather(np.int64(data.size))
    # process_allgather needs equal shapes: pad every payload to the longest, cut after.
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[i, : int(n)].tobytes()) for i, n in enumerate(sizes)]
