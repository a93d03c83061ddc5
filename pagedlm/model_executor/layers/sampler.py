"""Batched sampling: greedy, temperature, top-k, top-p and min-p, as tensor ops over the batch.

Random rows sample with the exponential-race (Gumbel-max) trick: ``argmax(p / E)`` with
``E ~ Exp(1)`` draws from ``p``. A seeded request draws its noise from its own generator, one full
vocabulary row per step, so its completion does not depend on what else is in the batch.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SamplingTensors:
    temperatures: torch.Tensor  # [S] float32, 1.0 on greedy rows
    top_ps: torch.Tensor  # [S] float32
    top_ks: torch.Tensor  # [S] int64, vocab size where off
    min_ps: torch.Tensor  # [S] float32
    greedy: torch.Tensor  # [S] bool
    generators: dict[int, torch.Generator]  # row -> generator of a seeded request
    all_greedy: bool
    do_top_p_top_k: bool
    do_min_p: bool
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) that must not be sampled


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled token ids [S] and their log-probabilities under the model's raw logits."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        if t.banned is not None:
            logits = logits.index_put(t.banned, torch.tensor(float("-inf"), device=logits.device))
        greedy_tokens = logits.argmax(dim=-1)
        if t.all_greedy:
            tokens = greedy_tokens
        else:
            tokens = torch.where(t.greedy, greedy_tokens, self._sample(logits, t))
        return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)

    def _sample(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        logits = logits / t.temperatures[:, None]
        if t.do_top_p_top_k:
            logits = _apply_top_k_top_p(logits, t.top_ks, t.top_ps)
        probs = logits.softmax(dim=-1)
        if t.do_min_p:
            probs = probs.masked_fill(probs < t.min_ps[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs).exponential_()
        for row, generator in t.generators.items():
            noise[row].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    sorted_logits.masked_fill_(ranks >= top_ks[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
    exceeded = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_ps[:, None]
    sorted_logits.masked_fill_(exceeded, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
