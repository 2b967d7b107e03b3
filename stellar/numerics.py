"""Numeric kernels whose results do not depend on the machine's BLAS.

Two promises rest on this module (README, "What is reproducible"):

* **The generator is byte-identical across BLAS thread counts and BLAS
  kernels.** OpenBLAS picks a kernel per CPU (Haswell, SkylakeX, Zen, ...;
  ``OPENBLAS_CORETYPE`` overrides it) and splits a matrix product into blocks
  per thread, and each choice rounds the sums differently, so ``a @ b`` can
  change in its last bit with ``OPENBLAS_NUM_THREADS`` or the CPU. The synth
  stage therefore never calls BLAS or LAPACK: :func:`ordered_matmul` is a
  product whose every multiply and add is a separate, correctly rounded
  IEEE-754 operation done in a fixed order, so it gives the same bits on every
  machine and thread count.
* **Everything else that is promised identical on rerun (preprocess
  statistics, the selection map's fit and placement) runs under one thread
  policy** (:func:`one_blas_thread`): BLAS and OpenMP limited to one thread
  in-process and in every Spark task alike, so the driver, a local run and an
  executor round the same way. Their results are then identical for any
  thread setting and partitioning on one kind of machine; across CPUs whose
  BLAS kernels differ (the SVD of the map's PCA) they agree only to rounding.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from typing import Callable, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable)

# Upper bound on the (rows, inner, cols) temporary of one ordered_matmul chunk, in elements (32 MB).
_CHUNK_ELEMENTS = 1 << 22


def ordered_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D float arrays without BLAS: the same bits on any CPU and thread count.

    Each output element is ``sum_k a[i, k] * b[k, j]`` with the products formed
    by numpy's elementwise multiply (no fused multiply-add) and summed by
    numpy's reduction over a middle axis, whose order is fixed by the array
    shapes alone. Rows are processed in chunks that bound the temporary to
    32 MB. About as fast as BLAS for the small inner dimensions used here
    (a few hundred); not meant for large square products.

    Args:
        a: (m, k) array.
        b: (k, n) array.

    Returns:
        (m, n) array in the result dtype of ``a * b``.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"ordered_matmul: shapes {a.shape} and {b.shape} do not chain")
    m, k = a.shape
    n = b.shape[1]
    out = np.empty((m, n), dtype=np.result_type(a, b))
    step = max(1, _CHUNK_ELEMENTS // max(1, k * n))
    for lo in range(0, m, step):
        out[lo:lo + step] = (a[lo:lo + step, :, None] * b[None, :, :]).sum(axis=1)
    return out


def ar1_powers(rho: float, n: int) -> np.ndarray:
    """``rho ** k`` for k = 0..n-1 by repeated multiplication (numpy's ``power`` is SIMD-dispatched
    per CPU and may differ in the last bit between instruction sets; a product chain does not)."""
    return np.cumprod(np.concatenate([[1.0], np.full(max(n - 1, 0), float(rho))]))[:n]


def ar1_correlation(rho: float, n: int) -> np.ndarray:
    """The AR(1) correlation matrix ``rho ** |i - j|`` (n, n)."""
    idx = np.arange(n)
    return ar1_powers(rho, n)[np.abs(idx[:, None] - idx[None, :])]


def ar1_cholesky(rho: float, n: int) -> np.ndarray:
    """Lower Cholesky factor of the AR(1) correlation matrix ``rho ** |i - j|``, in closed form.

    An AR(1) sequence ``z_0 = e_0``, ``z_i = rho z_{i-1} + sqrt(1 - rho^2) e_i``
    has exactly that correlation, so ``L[i, j] = rho^(i-j)`` for ``j = 0`` and
    ``rho^(i-j) sqrt(1 - rho^2)`` for ``0 < j <= i``. No LAPACK call, hence no
    dependence on the BLAS kernel.
    """
    if not -1.0 < rho < 1.0:
        raise ValueError(f"ar1_cholesky: |rho| must be < 1, got {rho}")
    idx = np.arange(n)
    lag = idx[:, None] - idx[None, :]
    power = np.where(lag >= 0, ar1_powers(rho, n)[np.maximum(lag, 0)], 0.0)
    scale = np.full(n, np.sqrt(1.0 - rho * rho))
    scale[0] = 1.0
    return power * scale[None, :]


# Libraries that bring their own BLAS or OpenMP runtime (scipy ships a second OpenBLAS, scikit-learn an
# OpenMP). threadpoolctl limits only the runtimes loaded when the limit is set, so these are imported
# first: a library loaded later inside the block would run with the environment's thread count.
PRELOAD = ("scipy.linalg", "sklearn.decomposition")


def one_blas_thread() -> AbstractContextManager:
    """Context manager: BLAS and OpenMP pools limited to one thread while it is open.

    The thread policy of every reproducible numeric step (module docstring).
    One thread, because that is what a Spark task gets anyway (PySpark sets
    ``OMP_NUM_THREADS`` to ``spark.task.cpus``), and the in-process path must
    round like the executors do. The runtimes of :data:`PRELOAD` are loaded
    first, so that the limit reaches them too.
    """
    import importlib

    from threadpoolctl import threadpool_limits

    for name in PRELOAD:
        importlib.import_module(name)
    return threadpool_limits(limits=1)


def with_one_blas_thread(fn: F) -> F:
    """Decorator form of :func:`one_blas_thread`, for functions that run inside Spark tasks."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with one_blas_thread():
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def fingerprint() -> dict:
    """What decides the last bits of numpy results on this machine, for manifests.

    Two machines with the same numpy version and SIMD level give the generator's
    bytes alike (transcendental functions are dispatched per SIMD level); the
    BLAS kernel and thread count matter only to the stages run under
    :func:`one_blas_thread`, listed here so that a difference can be traced.
    """
    from threadpoolctl import threadpool_info

    simd = {}
    try:
        from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__

        simd = {"baseline": list(__cpu_baseline__),
                "dispatched": [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]}
    except ImportError:  # private in numpy; absent or moved in other versions
        pass
    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"numpy": np.__version__, "simd": simd, "blas": blas}
