"""Typed messages between a plain process and rank 0 of the MPI world it started
(``remote.py`` / ``remote_rank0.py``), and their JSON encoding: nothing is unpickled.

The plain process sends one call at a time and waits for its reply. Rank 0 first sends a Hello.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from meshlm.engine.outputs import CompletionOutput, RequestOutput
from meshlm.sampling_params import SamplingParams


@dataclass(slots=True)
class Hello:
    """Rank 0's first message: what the proxy answers without asking."""

    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    max_batch_size: int
    max_num_tokens: int


@dataclass(slots=True)
class SubmitCall:
    prompt: str | list[int]
    params: SamplingParams
    request_id: str | None = None
    prompt_text: str | None = None


@dataclass(slots=True)
class AbortCall:
    request_id: str


@dataclass(slots=True)
class StepCall:
    pass


@dataclass(slots=True)
class ResetPrefixCacheCall:
    pass


@dataclass(slots=True)
class ShutdownCall:
    pass


@dataclass(slots=True)
class EngineState:
    """Sent back with every reply, so the proxy's gauges cost no round trip."""

    has_unfinished: bool = False
    has_pending_notices: bool = False
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    # Speculative decoding's counts (SpecDecodeStats' fields in order); None when it is off
    spec_decode: list[int] | None = None
    scheduler: list[int] = field(default_factory=list)  # SchedulerStats' fields in order


@dataclass(slots=True)
class Reply:
    """A call's result (``value``) or the error it raised (``error_type``: ValueError or KeyError,
    the errors of bad input; anything else ends the job on rank 0)."""

    value: object = None
    error_type: str | None = None
    error: str | None = None
    state: EngineState = field(default_factory=EngineState)


Call = SubmitCall | AbortCall | StepCall | ResetPrefixCacheCall | ShutdownCall
_CALLS = {cls.__name__: cls for cls in (SubmitCall, AbortCall, StepCall, ResetPrefixCacheCall, ShutdownCall)}


def encode_call(call: Call) -> bytes:
    body = {"call": type(call).__name__}
    if isinstance(call, SubmitCall):
        body.update(prompt=call.prompt, params=call.params.to_dict(), request_id=call.request_id,
                    prompt_text=call.prompt_text)
    elif isinstance(call, AbortCall):
        body["request_id"] = call.request_id
    return json.dumps(body).encode()


def decode_call(data: bytes) -> Call:
    body = json.loads(data)
    cls = _CALLS.get(body.pop("call", None))
    if cls is None:
        raise ValueError(f"unknown call in {data[:80]!r}")
    if cls is SubmitCall:
        body["params"] = SamplingParams.from_dict(body["params"])
    return cls(**body)


def encode_reply(reply: Reply) -> bytes:
    value = reply.value
    if isinstance(value, list):  # a step's outputs
        value = [_output_to_json(o) for o in value]
    return json.dumps({"value": value, "error_type": reply.error_type, "error": reply.error,
                       "state": asdict(reply.state)}).encode()


def decode_reply(data: bytes, call: Call) -> Reply:
    body = json.loads(data)
    value = body["value"]
    if isinstance(call, StepCall) and body["error"] is None:
        value = [_output_from_json(o) for o in value]
    return Reply(value, body["error_type"], body["error"], EngineState(**body["state"]))


def encode_hello(hello: Hello) -> bytes:
    return json.dumps(asdict(hello)).encode()


def decode_hello(data: bytes) -> Hello:
    return Hello(**json.loads(data))


def _output_to_json(output: RequestOutput) -> dict:
    body = asdict(output)
    for c in body["outputs"]:  # {token id: logprob} keys would become strings: send pairs
        if c["logprobs"] is not None:
            c["logprobs"] = [list(entry.items()) for entry in c["logprobs"]]
    if body["prompt_logprobs"] is not None:
        body["prompt_logprobs"] = [None if e is None else list(e.items()) for e in body["prompt_logprobs"]]
    return body


def _output_from_json(body: dict) -> RequestOutput:
    outputs = []
    for c in body.pop("outputs"):
        if c["logprobs"] is not None:
            c["logprobs"] = [{int(t): lp for t, lp in entry} for entry in c["logprobs"]]
        outputs.append(CompletionOutput(**c))
    if body["prompt_logprobs"] is not None:
        body["prompt_logprobs"] = [None if e is None else {int(t): lp for t, lp in e} for e in body["prompt_logprobs"]]
    return RequestOutput(outputs=outputs, **body)
