"""Which torch device a task runs on: the GPU Spark assigned to it, else CPU.

On a GPU cluster Spark hands each task its GPU addresses
(``spark.task.resource.gpu.amount``), visible through
``TaskContext.resources()["gpu"]``. Those are the node's physical ids; when
``CUDA_VISIBLE_DEVICES`` narrows what this process sees, the id is mapped to
its index among the visible devices.
"""

from __future__ import annotations

import os

import torch

from stellar.errors import StellarError


def task_gpu_addresses() -> list[str]:
    """The GPU addresses Spark assigned to the current task; empty outside a Spark task or without GPU
    scheduling."""
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - pyspark is a dependency
        return []
    ctx = TaskContext.get()
    if ctx is None:
        return []
    res = ctx.resources().get("gpu")
    return list(res.addresses) if res is not None else []


def task_cpus() -> int | None:
    """CPUs Spark gave this task (spark.task.cpus); None outside a Spark task."""
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - pyspark is a dependency
        return None
    ctx = TaskContext.get()
    return int(ctx.cpus()) if ctx is not None else None


def pick_device(prefer: str = "auto", gpu_addresses: list[str] | None = None,
                cuda_available: bool | None = None, visible: str | None = None) -> torch.device:
    """``prefer``: 'auto' (GPU when there is one), 'cuda' (must have one) or 'cpu'.

    The keyword arguments exist for tests; by default they are read from the
    Spark task, torch and the environment.
    """
    if prefer not in ("auto", "cuda", "cpu"):
        raise StellarError(f"device must be auto, cuda or cpu, got {prefer!r}")
    if prefer == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not has_cuda:
        if prefer == "cuda":
            raise StellarError("device 'cuda' was asked for but torch sees no GPU")
        return torch.device("cpu")
    addresses = task_gpu_addresses() if gpu_addresses is None else gpu_addresses
    if not addresses:
        return torch.device("cuda:0")
    addr = str(addresses[0]).strip()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if addr in ids:
            return torch.device(f"cuda:{ids.index(addr)}")
    return torch.device(f"cuda:{int(addr)}")


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels (CPU always; on GPU cuBLAS/cuDNN need these settings too)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
