"""``LLM``: the offline Python API, as vLLM users know it.

    from meshlm import LLM, SamplingParams
    llm = LLM()                                  # the built-in default model
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(out[0].outputs[0].text)
"""
from __future__ import annotations

from typing import Iterator, Sequence

from meshlm.config import EngineArgs
from meshlm.engine.coordinator import Coordinator
from meshlm.engine.interface import EngineCore
from meshlm.executor.model_runner import ModelRunner
from meshlm.engine.outputs import BeamSearchOutput, BeamSearchSequence, OutputsOfKind, RequestOutput
from meshlm.sampling_params import BeamSearchParams, SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate text with a model split over ``tensor_parallel_size x pipeline_parallel_size`` ranks.

    Keyword arguments are those of EngineArgs. With one rank the model runs in this process.
    With several, either this process is rank 0 of an mpiexec world of that size (the other ranks
    serve steps inside ``LLM(...)`` until rank 0 shuts down, then exit), or it is a plain process
    and starts the ranks itself under mpiexec.
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.args = EngineArgs(model=model, **kwargs)
        from meshlm.api.start import start_runtime
        self._coordinator = start_runtime(self.args)

    @property
    def tokenizer(self):
        return self._coordinator.tokenizer

    @property
    def engine_core(self) -> EngineCore:
        """Rank 0's engine: the coordinator, or a proxy to it when the ranks run under mpiexec."""
        return self._coordinator

    def local_model_runner(self) -> ModelRunner:
        """Rank 0's model runner when it runs in this process (for checks and benchmarks)."""
        if not isinstance(self._coordinator, Coordinator):
            raise RuntimeError("the model runs in other processes (started under mpiexec); "
                               "it has no model runner in this process")
        return self._coordinator.dispatcher.runner

    # --- generation ----------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids); outputs in prompt order."""
        prompts = _as_list(prompts)
        params = _params_for(prompts, sampling_params)
        ids = self._submit_all(prompts, params)
        final: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        for output in self._run(set(ids)):
            if output.finished and bar is not None:
                bar.update(1)
            if output.request_id in final:
                final[output.request_id].add(output)
            else:
                final[output.request_id] = RequestOutput.accumulate(output)
        if bar is not None:
            bar.close()
        return [final[i] for i in ids]

    def beam_search(self, prompts: Prompt | dict | Sequence[Prompt | dict],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search for every prompt (text, token ids, or vLLM's ``{"prompt": ...}`` /
        ``{"prompt_token_ids": [...]}``); each output holds ``params.beam_width`` beams, best first.
        The beams of all prompts run batched, sharing their KV blocks copy-on-write."""
        if isinstance(prompts, dict):
            prompts = [prompts]
        prompts = [p.get("prompt_token_ids", p.get("prompt")) if isinstance(p, dict) else p
                   for p in _as_list(prompts)]
        outputs = self.generate(prompts, params.to_sampling_params())
        return [BeamSearchOutput([BeamSearchSequence(out.prompt_token_ids + c.token_ids, [],
                                                     c.cumulative_logprob or 0.0, c.text, c.finish_reason,
                                                     c.stop_reason) for c in out.outputs])
                for out in outputs]

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self._coordinator.tokenizer.encode_chat(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params)

    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                        output_kind: str = "cumulative") -> Iterator[RequestOutput]:
        """Yield the request's output after every step that adds to it; the last one is finished.

        ``output_kind="cumulative"``: each output holds everything so far. ``"delta"``: only what
        is new since the previous one (vLLM's RequestOutputKind.DELTA).
        """
        outputs = OutputsOfKind(output_kind)
        (request_id,) = self._submit_all([prompt], [sampling_params or SamplingParams()])
        try:
            for output in self._run({request_id}):
                yield outputs.next(output)
        finally:
            if self._coordinator.abort(request_id):  # the caller stopped early
                self._drain()

    def _submit_all(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[str]:
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                p = p.with_bad_words_tokenized(self._coordinator.tokenizer)
                ids.append(self._coordinator.submit(prompt, p))
        except Exception:
            for request_id in ids:  # an invalid prompt rejects the whole call, leaving nothing queued
                self._coordinator.abort(request_id)
            raise
        return ids

    def _run(self, wanted: set[str]) -> Iterator[RequestOutput]:
        pending = set(wanted)
        while pending:
            for output in self._coordinator.step():
                if output.request_id in pending:
                    if output.finished:
                        pending.discard(output.request_id)
                    yield output

    def _drain(self) -> None:
        # Let the workers hear about aborted requests before the next call.
        self._coordinator.step()

    def shutdown(self) -> None:
        if self._coordinator is not None:
            self._coordinator.shutdown()
            self._coordinator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


def _as_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):  # a single prompt of token ids
        return [prompts]
    return prompts


def _params_for(prompts: list, sampling_params) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams() for _ in prompts]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * len(prompts)
    sampling_params = list(sampling_params)
    if len(sampling_params) != len(prompts):
        raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
    return sampling_params


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="requests", unit="req")
