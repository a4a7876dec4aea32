"""Logprobs in the completions API's shapes: OpenAI's legacy object and vLLM's ``prompt_logprobs``."""
from __future__ import annotations

from meshlm.server.serving import ServedModel


class LegacyLogprobs:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, served: ServedModel):
        self.served = served

    def format(self, entries: list[dict[int, float]], text_offset: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = text_offset
        for entry in entries:
            sampled, logprob = next(iter(entry.items()))  # the sampled token comes first
            text = self.served.token_text(sampled)
            tokens.append(text)
            token_logprobs.append(logprob)
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])
            top.append({self.served.token_text(t): lp for t, lp in ranked})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": offsets}

    def format_prompt(self, token_ids: list[int], entries: list[dict[int, float] | None] | None) -> dict:
        """The echoed prompt's part: its first token has null logprobs (nothing comes before it)."""
        if entries is None:
            raise RuntimeError("echo with logprobs: the engine returned no prompt logprobs")
        rest = self.format(entries[1:], len(self.served.token_text(token_ids[0])))
        return {"tokens": [self.served.token_text(token_ids[0]), *rest["tokens"]],
                "token_logprobs": [None, *rest["token_logprobs"]], "top_logprobs": [None, *rest["top_logprobs"]],
                "text_offset": [0, *rest["text_offset"]]}

    @staticmethod
    def join(first: dict, second: dict) -> dict:
        return {key: first[key] + second[key] for key in first}


def vllm_prompt_logprobs(served: ServedModel, entries: list[dict[int, float] | None] | None,
                         num_top: int) -> list | None:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or {"token id": {logprob, rank,
    decoded_token}}; ranks count from 1 among the ``num_top`` most likely tokens, and a prompt
    token outside them has rank null."""
    if entries is None:
        return None
    out: list = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        prompt_token = next(iter(entry))
        ranked = [t for t, _ in sorted(entry.items(), key=lambda kv: -kv[1])]
        if len(entry) > num_top:  # the prompt token is not among the top ones
            ranked.remove(prompt_token)
        out.append({str(t): {"logprob": lp, "rank": ranked.index(t) + 1 if t in ranked else None,
                             "decoded_token": served.token_text(t)} for t, lp in entry.items()})
    return out
