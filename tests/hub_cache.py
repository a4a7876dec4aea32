"""A Hugging Face hub cache built on disk, in the layout huggingface_hub writes, for tests without
network:

    add_snapshot(cache, "org/tiny", model_dir, commit=COMMIT_A, refs=("main",))
    # cache/models--org--tiny/blobs/<sha256 of each file>
    # cache/models--org--tiny/snapshots/COMMIT_A/<file> -> ../../blobs/<sha256>
    # cache/models--org--tiny/refs/main                  (holds COMMIT_A)

Point HF_HUB_CACHE at ``cache`` and set HF_HUB_OFFLINE=1 (``offline_hub_env``) to read it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

COMMIT_A = "a" * 8 + "1" * 32  # 40 hex digits: a commit id, as the Hub names snapshots
COMMIT_B = "b" * 8 + "2" * 32


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def add_snapshot(cache: Path, repo_id: str, source_dir: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Store every file of ``source_dir`` as the snapshot ``commit`` of ``repo_id``; each ref in
    ``refs`` (a branch or tag) points at it. Returns the snapshot directory."""
    folder = repo_folder(cache, repo_id)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for src in sorted(Path(source_dir).iterdir()):
        data = src.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / src.name)
    for ref in refs:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


def offline_hub_env(cache: Path) -> dict[str, str]:
    """The variables that make meshlm (and huggingface_hub) read ``cache`` and never reach the Hub."""
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(Path(cache).parent / "hf-home")}
