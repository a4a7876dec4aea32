"""What the server accepts, per request and per connection; every limit is a ``meshlm serve`` flag.

Requests past a limit are refused before any work is done, with OpenAI's error envelope: 413 for a
body over ``max_request_body_bytes``, 400 for ``n`` or a prompt list over their maxima, and 503 for
a connection past ``limit_concurrency``. A connection whose request (head and body) has not arrived
within ``request_read_timeout_s`` is closed.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

# A token of the vocabularies in use covers far fewer characters than this; a text longer than
# max_model_len * _MAX_CHARS_PER_TOKEN cannot fit the context, so it is refused untokenized.
MAX_CHARS_PER_TOKEN = 64


@dataclass(slots=True)
class ServerLimits:
    max_request_body_bytes: int = 8 * 1024 * 1024  # bodies of long-context prompts fit; a stray upload does not
    max_n: int = 128  # samples per prompt (OpenAI's own maximum)
    max_prompts: int = 1024  # prompts in one /v1/completions request
    limit_concurrency: int = 4096  # open connections; lowered to what the open-files limit allows
    request_read_timeout_s: float = 30.0  # from connection (or the last response) to a whole request
    timeout_keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_n", "max_prompts", "limit_concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        for name in ("request_read_timeout_s", "timeout_keep_alive_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name}={value!r} must be a positive number of seconds")

    _HELP = {
        "max_request_body_bytes": "largest request body in bytes; larger ones get 413",
        "max_n": "largest n (samples per prompt)",
        "max_prompts": "most prompts in one /v1/completions request",
        "limit_concurrency": "most open connections (at most the open-files limit less a reserve); "
                             "a connection past it gets 503 and is closed",
        "request_read_timeout_s": "seconds a connection has to send a whole request (head and body); "
                                  "then it is closed",
        "timeout_keep_alive_s": "seconds an idle keep-alive connection stays open",
    }

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        defaults = cls()
        for f in fields(cls):
            default = getattr(defaults, f.name)
            flag = "--" + f.name.removesuffix("_s").replace("_", "-")
            parser.add_argument(flag, dest=f.name, type=type(default), default=default,
                                help=f"{cls._HELP[f.name]} (default: {default})")

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> "ServerLimits":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})
