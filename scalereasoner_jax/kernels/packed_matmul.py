"""A CPU kernel for the projections of a decoding step: x (a few rows) @ W, with W packed in panels.

A decoding step multiplies a handful of rows by every weight matrix, so it is bound by streaming the
weights from memory. XLA:CPU's dot reads a row-major (K, N) weight in column slices, a strided walk
the prefetchers do not follow, and its time becomes the streaming plus the arithmetic of the rows.
Packed once per generation as panels (N / 32, K, 32), each panel is one contiguous stream and the
product runs at the memory bandwidth (``packed_matmul.cc``).

The kernel is compiled on first use with the system C++ compiler against jaxlib's XLA FFI headers,
for this machine's CPU (AVX-512), and cached by source, flags, jaxlib version and CPU. Where it
cannot be built, ``available()`` says why not and callers keep ``jnp.dot``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

PANEL = 32  # columns per panel; N must be a multiple of it
_MATMUL = "scalereasoner_packed_matmul"
_PACK = "scalereasoner_pack"
_SOURCE = Path(__file__).with_name("packed_matmul.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where built kernels live: ``$SCALEREASONER_KERNEL_CACHE``, else the user's cache folder."""
    if env := os.environ.get("SCALEREASONER_KERNEL_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scalereasoner_jax" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next(
        (set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set()
    )


def _build() -> Path:
    """The shared library for this source, compiler flags, jaxlib and CPU; compiled if not cached."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    for part in (
        _SOURCE.read_bytes(),
        " ".join(_FLAGS).encode(),
        jax.__version__.encode(),
        " ".join(sorted(_cpu_flags())).encode(),
        compiler.encode(),
    ):
        key.update(part)
    out = cache_dir() / f"packed_matmul-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed, so concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [
                line for line in done.stderr.splitlines() if "error" in line
            ] or done.stderr.splitlines()
            raise RuntimeError(f"{shlex.join(cmd)} failed:\n" + "\n".join(errors[-10:]))
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernel once; None if it is ready, else why it is not."""
    if platform.machine().lower() not in ("x86_64", "amd64") or "avx512f" not in _cpu_flags():
        return "the packed CPU matmul needs an x86-64 CPU with AVX-512F"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, RuntimeError) as e:
        log.warning("packed CPU matmul unavailable, decoding uses XLA's dot: %s", e)
        return str(e)
    jax.ffi.register_ffi_target(_MATMUL, jax.ffi.pycapsule(library.ScalereasonerPackedMatmul), platform="cpu")
    jax.ffi.register_ffi_target(_PACK, jax.ffi.pycapsule(library.ScalereasonerPack), platform="cpu")
    return None


def available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def packable(kernel: jax.Array) -> bool:
    """Whether a (K, N) weight can take the packed path: float32 and N a multiple of the panel."""
    return kernel.ndim == 2 and kernel.dtype == jnp.float32 and kernel.shape[1] % PANEL == 0


def packed_shape(kernel: jax.Array) -> tuple[int, int, int]:
    k, n = kernel.shape
    return n // PANEL, k, PANEL


def pack(kernel: jax.Array, into: jax.Array | None = None) -> jax.Array:
    """(K, N) -> panels (N / 32, K, 32): panel p holds columns 32p .. 32p + 31, row after row.

    ``into``: panels of the same shape whose memory the result takes over (donate them to the jit):
    a fresh buffer of this size costs more in page faults than the packing itself.
    """
    if not packable(kernel):
        raise ValueError(
            f"cannot pack a {kernel.dtype} weight of shape {kernel.shape}: need float32 (K, N) "
            f"with N a multiple of {PANEL}"
        )
    if reason := _load():
        raise RuntimeError(reason)
    out = jax.ShapeDtypeStruct(packed_shape(kernel), jnp.float32)
    if into is None:
        into = jnp.empty(out.shape, out.dtype)
    elif into.shape != out.shape or into.dtype != jnp.float32:
        raise ValueError(f"pack: into is {into.dtype}{into.shape}, need float32{out.shape}")
    return jax.ffi.ffi_call(_PACK, out, input_output_aliases={1: 0})(kernel, into)


def packed_matmul(x: jax.Array, packed: jax.Array) -> jax.Array:
    """``x (..., K) @ W`` for ``packed = pack(W)``, in float32 on the CPU."""
    if reason := _load():
        raise RuntimeError(reason)
    panels, k, _ = packed.shape
    if x.shape[-1] != k or x.dtype != jnp.float32 or packed.dtype != jnp.float32:
        raise ValueError(
            f"packed_matmul: x {x.dtype}{x.shape} does not match packed {packed.dtype}{packed.shape}"
        )
    rows = x.reshape(-1, k)
    out = jax.ShapeDtypeStruct((rows.shape[0], panels * PANEL), jnp.float32)
    return jax.ffi.ffi_call(_MATMUL, out)(rows, packed).reshape(*x.shape[:-1], panels * PANEL)
