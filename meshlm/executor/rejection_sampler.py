"""Speculative decoding's verification: which draft tokens a verify step accepts, and the token
sampled after them.

A sample row with ``d`` drafts has ``1 + d`` logits rows: row ``j`` scores the draft ``x_j`` (the
token after it in the sequence) and the last row follows the last draft. Drafts here are
deterministic (n-gram lookup), so the draft distribution ``q`` is one-hot and the standard rule
(accept ``x_j`` with probability ``min(1, p_j(x_j) / q_j(x_j))``, on rejection sample from the
normalised residual ``max(0, p_j - q_j)``, after ``d`` acceptances sample a bonus token from
``p_d``) becomes: accept ``x_j`` with probability ``p_j(x_j)``; on the first rejection sample from
``p_j`` with ``x_j`` removed. Each emitted token is then distributed exactly as the target samples
it. A greedy row accepts while ``x_j`` is the argmax and then takes the argmax, which is what
decoding without drafts gives.
"""
from __future__ import annotations

import torch

__all__ = ["verify_drafts"]


def verify_drafts(probs: torch.Tensor, greedy_tokens: torch.Tensor, is_greedy: torch.Tensor,
                  draft_ids: torch.Tensor, num_drafts: torch.Tensor, uniforms: torch.Tensor,
                  noise: torch.Tensor, max_drafts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept drafts and sample the token after them, batched over sample rows.

    probs [num_logits, vocab]: the target's distribution at each logits row (any values on greedy
    rows); greedy_tokens [num_logits]: its argmax; is_greedy [num_logits] bool; draft_ids
    [num_logits]: the draft each row scores (ignored on a sample row's last row); num_drafts
    [num_samples] int64 and ``max_drafts``, its maximum (from the host); uniforms [num_logits] in
    [0, 1); noise [num_logits, vocab] ~ Exp(1).

    Returns ``(token_ids [num_samples, 1 + max_drafts], num_tokens [num_samples], last_row
    [num_samples])``: row ``i`` emits ``token_ids[i, :num_tokens[i]]`` (its accepted drafts, then
    the sampled token; -1 after them), and ``last_row[i]`` is the logits row its sampled token
    came from.
    """
    device = probs.device
    counts = num_drafts + 1
    num_samples = len(counts)
    starts = torch.cumsum(counts, 0) - counts  # [num_samples]: each sample row's first logits row
    # [num_logits]; output_size saves a wait for the device (counts live there)
    row_of = torch.repeat_interleave(torch.arange(num_samples, device=device), counts, output_size=len(probs))
    position = torch.arange(len(row_of), device=device) - starts[row_of]  # [num_logits]: j
    has_draft = position < num_drafts[row_of]
    safe_drafts = torch.where(has_draft, draft_ids, 0)
    p_draft = probs.gather(1, safe_drafts[:, None])[:, 0]  # [num_logits]
    accepted = torch.where(is_greedy, safe_drafts == greedy_tokens, uniforms < p_draft) & has_draft
    # The first rejected position of each sample row (its last row never accepts): the number accepted.
    # (Accepted rows count as past the end: a boolean index would make the host wait for the device.)
    num_accepted = torch.full((num_samples,), len(row_of), dtype=torch.int64, device=device)
    num_accepted.scatter_reduce_(0, row_of, torch.where(accepted, len(row_of), position), reduce="amin")
    last_row = starts + num_accepted  # [num_samples]

    target = probs[last_row]  # [num_samples, vocab]
    rejected = num_accepted < num_drafts  # the last row scored a draft, which was refused
    residual = torch.where(rejected[:, None], target.scatter(1, safe_drafts[last_row][:, None], 0.0), target)
    # A draft of probability 1 is always accepted, so an empty residual is never drawn from.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target)
    # The exponential race argmax(residual / q), q ~ Exp(1): an exact draw, needing no normalisation.
    race_noise = noise[last_row].clamp(min=torch.finfo(noise.dtype).tiny)
    sampled = (residual / race_noise).argmax(dim=-1)
    final = torch.where(is_greedy[last_row], greedy_tokens[last_row], sampled)  # [num_samples]

    column = torch.arange(1 + max_drafts, device=device)  # [1 + max_drafts]
    draft_index = (starts[:, None] + column[None, :]).clamp(max=len(row_of) - 1)  # [num_samples, 1 + max_drafts]
    token_ids = torch.where(column[None, :] < num_accepted[:, None], safe_drafts[draft_index],
                            torch.where(column[None, :] == num_accepted[:, None], final[:, None], -1))
    return token_ids, num_accepted + 1, last_row
