"""Tokenizer, chat template and incremental detokenization (rank 0 only)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value


class Tokenizer:
    """tokenizer.json plus the chat template and special tokens of tokenizer_config.json."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json (meshlm reads the fast-tokenizer format)")
        self._tok = HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        jinja_path = model_dir / "chat_template.jinja"
        if self.chat_template is None and jinja_path.is_file():
            self.chat_template = jinja_path.read_text()
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values())))
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages to the prompt text, as transformers' apply_chat_template does."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        if self._template is None:
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """The rendered conversation's token ids; ``tools`` (OpenAI's tool definitions) reach the
        template as ``tools``, as transformers passes them."""
        extra = {} if tools is None else {"tools": tools}
        # The template writes any BOS itself, so no special tokens are added on top.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra),
                           add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a sequence's growing output token ids into text deltas.

    A few prompt tokens are kept as context so tokenizers that drop a leading space at the start
    of a decode (SentencePiece) still produce the right first word, and a delta is released only
    once it no longer ends in an incomplete UTF-8 sequence. The output ids are the request's own
    list, passed in on every call; only offsets into it are kept here.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.context = list(prompt_token_ids[-self.CONTEXT_TOKENS:])
        # Offsets into context + output ids: text before read_offset has been handed out.
        self.prefix_offset = 0
        self.read_offset = len(self.context)

    def add(self, output_token_ids: Sequence[int]) -> str:
        """The new text after the last id of ``output_token_ids`` was appended ("" while incomplete)."""
        end = len(self.context) + len(output_token_ids)
        prefix_text = self._decode(output_token_ids, self.prefix_offset, self.read_offset)
        full_text = self._decode(output_token_ids, self.prefix_offset, end)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, end
            return full_text[len(prefix_text):]
        return ""

    def _decode(self, output_token_ids: Sequence[int], start: int, end: int) -> str:
        n = len(self.context)
        ids = self.context[start:end] + list(output_token_ids[max(0, start - n):max(0, end - n)])
        return self.tokenizer.decode(ids, self.skip_special_tokens)
