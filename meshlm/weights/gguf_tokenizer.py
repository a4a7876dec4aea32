"""The Hugging Face tokenizer files of a llama GGUF: tokenizer.json built from its vocabulary and
merges with the ``tokenizers`` package, and tokenizer_config.json with its special tokens and chat
template. ``meta`` below is gguf_import's LlamaGGUFMetadata."""
from __future__ import annotations

# llama.cpp's gguf token types (tokenizer.ggml.token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how llama.cpp splits text before BPE. "digits": every digit alone, then the
# GPT-2 split (llama.cpp's STARCODER/SMOLLM family); "gpt2": the GPT-2 split; "llama3": its own regex.
PRE_TOKENIZER_KINDS = {
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "command-r": "digits", "exaone": "digits", "minerva-7b": "digits",
    "gpt-2": "gpt2", "gpt2": "gpt2", "default": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
}


def hf_tokenizer_config(meta) -> dict:
    """`tokenizer_config.json`: special tokens, BOS/EOS flags and the chat template."""
    specials = [meta.tokens[i] for i, t in enumerate(meta.token_types) if t == TOKEN_TYPE_CONTROL]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": meta.is_bos_added,
        "add_eos_token": meta.is_eos_added,
        "bos_token": meta.token(meta.bos_token_id),
        "eos_token": meta.token(meta.eos_token_id),
        "unk_token": meta.token(meta.unk_token_id),
        "pad_token": meta.token(meta.pad_token_id),
        "additional_special_tokens": specials,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.max_position_embeddings,
    }
    if meta.chat_template is not None:
        config["chat_template"] = meta.chat_template
    return config


def build_tokenizer(meta):
    """A `tokenizers.Tokenizer` that splits and merges as llama.cpp does for this GGUF."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(meta.tokens)}
    merges = [_split_merge(m) for m in meta.merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    kind = PRE_TOKENIZER_KINDS[meta.pre_tokenizer]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=kind != "llama3")
    if kind == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif kind == "llama3":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(meta, processors)
    special = [AddedToken(meta.tokens[i], special=True, normalized=False)
               for i, t in enumerate(meta.token_types) if t == TOKEN_TYPE_CONTROL]
    user_defined = [AddedToken(meta.tokens[i], special=False, normalized=False)
                    for i, t in enumerate(meta.token_types) if t == TOKEN_TYPE_USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)
    if tokenizer.get_vocab_size(with_added_tokens=True) != meta.vocab_size:
        raise ValueError(f"the tokenizer built from the GGUF has {tokenizer.get_vocab_size(True)} tokens; "
                         f"the GGUF lists {meta.vocab_size}")
    return tokenizer


def _post_processor(meta, processors):
    if not (meta.is_bos_added or meta.is_eos_added):
        return processors.ByteLevel(trim_offsets=False)
    bos, eos = meta.token(meta.bos_token_id), meta.token(meta.eos_token_id)
    prefix = f"{bos} " if meta.is_bos_added else ""
    suffix = f" {eos}" if meta.is_eos_added else ""
    specials = [(t, i) for t, i, on in [(bos, meta.bos_token_id, meta.is_bos_added),
                                       (eos, meta.eos_token_id, meta.is_eos_added)] if on]
    return processors.TemplateProcessing(single=f"{prefix}$A{suffix}",
                                         pair=f"{prefix}$A{suffix} {prefix}$B:1{suffix}",
                                         special_tokens=specials)


def _split_merge(merge: str) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2:
        raise ValueError(f"GGUF merge {merge!r} is not two tokens separated by one space")
    return parts[0], parts[1]
