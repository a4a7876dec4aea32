"""Models named by Hugging Face repo id (``--model ORG/NAME``): found in the hub cache, fetched into
it the first time.

huggingface_hub does the fetching, with its own cache layout (``models--ORG--NAME/snapshots/<commit>/``
beside ``refs/<branch>``), progress bars and token (HF_TOKEN, else the stored login). meshlm picks
the cache (``--download-dir``, else HF_HUB_CACHE or $HF_HOME/hub), honours HF_HUB_OFFLINE, and asks
only for the files it reads.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

from meshlm.launcher import env

# The files meshlm reads from a model directory (checkpoint.py, model_config.py, the tokenizer,
# eos ids); nothing else is fetched.
ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
# Sub-folders hold other formats (e.g. original/); consolidated*.safetensors is Mistral's own layout,
# a second copy of the weights under other tensor names.
IGNORE_PATTERNS = ["*/*", "consolidated*.safetensors"]

# namespace/name: letters, digits, '-', '_', '.', neither part starting with '.' or '-'.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")


def hub_repo_id(model: str | None) -> str | None:
    """``model`` itself when it names a Hub repo (``ORG/NAME``, and no such local path), else None.

    A local path that exists always wins, so a directory ``org/name`` under the working directory
    is read as a directory.
    """
    if model is None or Path(model).expanduser().exists():
        return None
    model = str(model)
    if not _REPO_ID.fullmatch(model) or "--" in model or ".." in model or model.endswith(".git"):
        return None
    return model


def hub_snapshot_dir(repo_id: str, revision: str | None = None, download_dir: str | None = None,
                     local_files_only: bool = False) -> Path:
    """The snapshot directory of ``repo_id`` at ``revision`` (branch, tag or commit; default main).

    Fetches the missing files unless HF_HUB_OFFLINE is set or ``local_files_only``. Raises
    FileNotFoundError naming this host and the cache folder when the snapshot is not there and
    cannot be fetched, and RuntimeError when the Hub refuses (unknown repo or revision, gated repo).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache = Path(download_dir).expanduser() if download_dir else env.hub_cache_dir()
    offline = env.hub_offline() or local_files_only
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=offline,
                                 allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(_not_in_cache(repo_id, revision, cache, offline, exc)) from None
    except RepositoryNotFoundError as exc:  # also gated repos without a token that may read them
        raise RuntimeError(f"model {repo_id!r}: the Hugging Face Hub refused it on node {socket.gethostname()} "
                           f"({_first_line(exc)}). Check the name; for a gated or private repo accept its "
                           f"terms on the Hub and set HF_TOKEN (or run `hf auth login`)") from None
    except HfHubHTTPError as exc:  # an unknown revision, the Hub down, ...
        raise RuntimeError(f"model {repo_id!r} revision {revision or 'main'!r}: the Hugging Face Hub "
                           f"answered {_first_line(exc)}") from None
    return Path(path)


def _not_in_cache(repo_id: str, revision: str | None, cache: Path, offline: bool, exc: Exception) -> str:
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    why = ("HF_HUB_OFFLINE is set, so meshlm did not reach the Hub" if offline
           else f"the Hub could not be reached ({_first_line(exc)})")
    return (f"model {repo_id!r} revision {revision or 'main'!r} is not in the Hugging Face cache on node "
            f"{socket.gethostname()}: looked in {folder}, and {why}. Fetch it on a machine with network "
            f"into a cache every node sees (HF_HUB_CACHE, HF_HOME or --download-dir), or pass --model "
            f"with a local directory")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
