"""Batched sampling: penalties, logits processors, greedy, temperature, top-k, top-p, min-p.

Tokens come from the ``sample`` op: temperature, top-k, top-p and min-p select the kept tokens and
one uniform number per row picks among them by inverse CDF, without sorting the vocabulary. A
seeded completion draws its number from its own generator, one a step, so it does not depend on
what else is in the batch. Reported log-probabilities are the model's raw ones (log-softmax of its
logits), as Hugging Face's are, after a structured output's token bitmask: vLLM applies it to the
logits before its sampler, so a token the grammar leaves out has probability 0 and the allowed ones
share all of it.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pagedlm import ops
from pagedlm.model_executor.layers.direct_call import DirectCall
from pagedlm.ops import reference
from pagedlm.ops.sampling import argmax_and_neg_log_sum, log_softmax, token_logprobs
from pagedlm.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    """One row per token to sample."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    generators: dict[int, torch.Generator]  # row -> generator of a seeded completion
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) that may not be sampled yet
    allowed: tuple[torch.Tensor, torch.Tensor] | None  # (rows, int32 [rows, ceil(V / 32)] token bitmasks)
    beam_allowed: tuple[torch.Tensor, torch.Tensor] | None  # the beam rows' of them
    forced: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) each row must take
    beam_rows: list[int]  # rows whose processed log-probabilities beam search needs
    temperatures: torch.Tensor  # [R] float32, 0.0 on greedy rows
    top_ps: torch.Tensor
    top_ks: torch.Tensor  # [R] int64, vocab size where off
    min_ps: torch.Tensor
    num_top_logprobs: int  # the largest ``logprobs`` asked for (0 for logprob_token_ids rows), -1 when none
    logprob_token_ids: dict[int, list[int]]  # row -> the ids whose log-probabilities it returns
    needs_processing: bool  # allowed ids, logit bias, penalties, processors, bans, forced tokens, masked beams
    plain_greedy: bool  # every row greedy on the (bitmasked) raw logits, reporting no log-probability
    reports_logprobs: bool  # some row reports its sampled token's log-probability (cumulative_logprob)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        banned_token_ids: list[Sequence[int]],
        generators: dict[int, torch.Generator],
        beam_rows: list[int],
        vocab_size: int,
        device: torch.device,
        token_bitmasks: list[torch.Tensor | None] | None = None,
        forced_token_ids: list[int | None] | None = None,
    ) -> "SamplingMetadata":
        def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype, device=device)

        def bitmasks(rows_and_masks: list) -> tuple[torch.Tensor, torch.Tensor] | None:
            if not rows_and_masks:
                return None
            rows, masks = zip(*rows_and_masks)
            return tensor(list(rows), torch.int64), torch.stack(masks).to(device)

        banned_rows, banned_ids = [], []
        for row, banned in enumerate(banned_token_ids):
            banned_rows += [row] * len(banned)
            banned_ids += banned
        masked = [(row, mask) for row, mask in enumerate(token_bitmasks or ()) if mask is not None]
        beams = set(beam_rows)
        beam_masked = [(row, mask) for row, mask in masked if row in beams]
        forced = [(row, t) for row, t in enumerate(forced_token_ids or ()) if t is not None]
        needs_processing = bool(banned_rows) or bool(forced) or bool(beam_masked) or any(
            p.has_penalties or p.logits_processors or p.changes_logits for p in params)
        logprob_token_ids = {row: p.logprob_token_ids for row, p in enumerate(params) if p.logprob_token_ids}
        num_top_logprobs = max((0 if p.logprob_token_ids else p.logprobs for p in params if p.num_logprobs is not None),
                               default=-1)
        reports_logprobs = any(p.reports_cumulative_logprob for p in params)
        greedy = not reports_logprobs and all(p.greedy for p in params)
        return cls(
            params=params,
            prompt_token_ids=prompt_token_ids,
            output_token_ids=output_token_ids,
            generators=generators,
            banned=(tensor(banned_rows, torch.int64), tensor(banned_ids, torch.int64)) if banned_rows else None,
            allowed=bitmasks(masked),
            beam_allowed=bitmasks(beam_masked),
            forced=(tensor([r for r, _ in forced], torch.int64), tensor([t for _, t in forced], torch.int64))
            if forced else None,
            beam_rows=beam_rows,
            temperatures=tensor([0.0 if p.greedy else p.temperature for p in params], torch.float32),
            top_ps=tensor([p.top_p for p in params], torch.float32),
            top_ks=tensor([p.top_k or vocab_size for p in params], torch.int64),
            min_ps=tensor([p.min_p for p in params], torch.float32),
            num_top_logprobs=num_top_logprobs,
            logprob_token_ids=logprob_token_ids,
            needs_processing=needs_processing,
            plain_greedy=greedy and not needs_processing,
            reports_logprobs=reports_logprobs,
        )


@dataclass
class SamplerResult:
    token_ids: torch.Tensor  # [R]
    logprobs: torch.Tensor | None  # [R] raw log-probability of each sampled token; None where no row reports it
    ranks: torch.Tensor | None  # [R] rank of each sampled token, when logprobs were asked for
    top_ids: torch.Tensor | None  # [R, K]
    top_logprobs: torch.Tensor | None  # [R, K]
    beam_logprobs: torch.Tensor | None  # [len(beam_rows), V] processed log-probabilities (beams rank by these)
    beam_raw_logprobs: torch.Tensor | None  # [len(beam_rows), V] the model's (beams report these)
    no_token_rows: list[int] = field(default_factory=list)  # rows processing left all -inf: no token to sample
    # row -> (log-probabilities, ranks) of its logprob_token_ids
    token_id_logprobs: dict[int, tuple[list[float], list[int]]] = field(default_factory=dict)

    @classmethod
    def greedy(cls, token_ids: torch.Tensor) -> "SamplerResult":
        """A plain greedy step's result (``SamplingMetadata.plain_greedy``): its tokens alone."""
        return cls(token_ids, None, None, None, None, None, None)


class Sampler(DirectCall, nn.Module):
    """``generator``: draws for the rows of completions without a seed of their own (``LLM(seed=)``);
    torch's default generator when None."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerResult:
        tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        # Beams report the model's log-probabilities from before a grammar's mask, and rank by them
        # masked, not normalised again (Hugging Face's prefix-constrained beam search; vLLM's
        # offline search filters its raw log-probabilities so).
        beam_raw_logprobs = log_softmax(logits[meta.beam_rows]) if meta.beam_rows else None
        if meta.allowed is not None:
            ops.apply_token_bitmask(logits, *meta.allowed)
        if meta.plain_greedy:
            ops.argmax(logits, tokens)  # argmax_logprob's tokens, without the exp pass of its log-sum
            return SamplerResult.greedy(tokens)
        # ``sample``'s log-probabilities: where processing needs them (NaN marks a row it left without a
        # token), or a row reports them and top_logprobs, which gives them too, does not run.
        chosen = (torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
                  if meta.needs_processing or (meta.reports_logprobs and meta.num_top_logprobs < 0) else None)
        processed = logits
        if meta.needs_processing:
            # A copy even for fp32 logits: the raw ones are still needed for the reported logprobs.
            processed = logits.to(torch.float32, copy=True)
            if meta.beam_rows:
                # Hugging Face's beam search runs the processors on the log-probabilities (and does
                # not normalise again), not on the logits as sampling does: a repetition penalty
                # multiplies a log-probability, a ban leaves the others' as they were.
                processed[meta.beam_rows] = beam_raw_logprobs
                if meta.beam_allowed is not None:
                    ops.apply_token_bitmask(processed, *meta.beam_allowed)
            processed = self._process(processed, meta)
            if meta.beam_allowed is not None:  # again: no processor lifts a beam out of its grammar
                ops.apply_token_bitmask(processed, *meta.beam_allowed)
        ops.sample(processed, meta.temperatures, meta.top_ks, meta.top_ps, meta.min_ps, self._uniforms(meta), tokens, chosen)
        no_token_rows = _no_token_rows(processed, chosen) if meta.needs_processing else []
        # ``chosen`` is the log-probability under the logits ``sample`` saw; after processing, the
        # raw one is recomputed (by ops.top_logprobs, with the ranks and top entries, when those
        # were asked for).
        ranks = top_ids = top_logprobs = beam_logprobs = None
        if meta.num_top_logprobs >= 0:
            chosen = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
            ranks, top_logprobs, top_ids = rank_and_top_logprobs(logits, tokens, meta.num_top_logprobs, chosen)
        elif meta.needs_processing:
            chosen = _raw_logprob(logits, tokens) if meta.reports_logprobs else None
        if meta.beam_rows:
            beam_logprobs = processed[meta.beam_rows] if meta.needs_processing else beam_raw_logprobs
        return SamplerResult(tokens, chosen, ranks, top_ids, top_logprobs, beam_logprobs, beam_raw_logprobs,
                             no_token_rows, _token_id_logprobs(logits, meta.logprob_token_ids))

    def _uniforms(self, meta: SamplingMetadata) -> torch.Tensor:
        uniforms = torch.rand(len(meta.params), generator=self.generator, device=meta.temperatures.device)
        for row, generator in meta.generators.items():
            uniforms[row] = torch.rand(1, generator=generator, device=generator.device)[0]
        return uniforms

    def _process(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """allowed_token_ids and logit_bias first (vLLM's order), then the penalties and the user's
        logits processors in Hugging Face's order (its generate runs a caller's processors after
        its repetition penalty; vLLM V0 ran them first, on the raw logits), then the min_tokens
        and bad_words bans, last so that no processor lifts them (Hugging Face bans for
        min_new_tokens before a caller's processors). A forced token (``thinking_token_budget``)
        comes last, over all of it, as vLLM forces after its processors. The structured outputs'
        token bitmasks came before all of it, on the raw logits; the reported log-probabilities are
        the raw logits' either way, the forced token's too (vLLM's)."""
        for row, p in enumerate(meta.params):
            if p.changes_logits:
                _apply_allowed_and_bias(logits[row], p)
        penalized = [row for row, p in enumerate(meta.params) if p.has_penalties]
        if penalized:
            _apply_penalties(logits, meta, penalized)
        for row, p in enumerate(meta.params):
            if p.logits_processors:
                logits[row] = p.apply_logits_processors(meta.prompt_token_ids[row], meta.output_token_ids[row], logits[row])
        if meta.banned is not None:
            logits.index_put_(meta.banned, torch.tensor(float("-inf"), device=logits.device))
        if meta.forced is not None:
            rows, token_ids = meta.forced
            logits[rows] = float("-inf")
            logits[rows, token_ids] = 0.0
        return logits


def _no_token_rows(processed: torch.Tensor, chosen: torch.Tensor) -> list[int]:
    """Rows of ``processed`` [rows, vocab] with every logit -inf, from ``sample``'s ``chosen``
    log-probabilities [rows]: NaN there (-inf minus an -inf maximum) and in rows with a +inf logit
    (a processor forcing a token, which ``sample`` takes), told apart by the row's maximum."""
    suspects = chosen.isnan().nonzero()[:, 0]
    if not len(suspects):
        return []
    return suspects[processed[suspects].amax(dim=1) == float("-inf")].tolist()


def _token_id_logprobs(logits: torch.Tensor, ids_of: dict[int, list[int]]) -> dict[int, tuple[list[float], list[int]]]:
    """For each row of ``ids_of`` (row of ``logits`` [rows, vocab] -> token ids): the ids' raw
    log-probabilities, in ``_raw_logprob``'s formula, and their ranks, how many of the row's
    log-probabilities are at least theirs (the sampled token's rank, ``ops.top_logprobs``'; NaN and
    rank 1 in a row with no softmax)."""
    if not ids_of:
        return {}
    rows = torch.tensor(list(ids_of), dtype=torch.int64, device=logits.device)
    _, top, neg_log_sum = argmax_and_neg_log_sum(logits[rows])
    no_softmax = reference.no_softmax(top, neg_log_sum)[:, 0].tolist()
    result = {}
    for i, (row, ids) in enumerate(ids_of.items()):
        logprobs = (logits[row].float() - top[i]) + neg_log_sum[i]
        values = logprobs[torch.tensor(ids, dtype=torch.int64, device=logits.device)]
        if no_softmax[i]:
            result[row] = (values.tolist(), [1] * len(ids))
            continue
        # One pass over the vocabulary whatever the number of ids: each entry's place among the
        # sorted values says which of them it is at least as likely as.
        order = values.argsort()
        places = torch.searchsorted(values[order], logprobs, right=True)
        at_least = torch.bincount(places, minlength=len(ids) + 1).flip(0).cumsum(0).flip(0)[1:]
        ranks = torch.empty_like(at_least)
        ranks[order] = at_least
        result[row] = (values.tolist(), ranks.clamp(min=1).tolist())
    return result


def _apply_allowed_and_bias(row: torch.Tensor, p: SamplingParams) -> None:
    """vLLM's first two changes to a row of logits [vocab], in place: every id outside
    ``allowed_token_ids`` to -inf, then ``logit_bias`` added."""
    if p.allowed_token_ids is not None:
        allowed = torch.tensor(p.allowed_token_ids, dtype=torch.int64, device=row.device)
        kept = row[allowed]
        row.fill_(float("-inf"))
        row[allowed] = kept
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=row.device)
        row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device))


def _raw_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The log-probability of ``tokens`` under the softmax of ``logits`` [rows, vocab], float32, with
    the formula of the ``argmax_logprob`` and ``sample`` kernels, ``(x[t] - max) - log(sum(exp(x - max)))``,
    so a row's value (and its sequence's cumulative_logprob) is the same whichever path the rest of
    the batch sends it down."""
    _, top, neg_log_sum = argmax_and_neg_log_sum(logits)
    return token_logprobs(logits, tokens, top, neg_log_sum)


def rank_and_top_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int, logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row of ``logits`` [rows, vocab]: the raw log-probability of ``token_ids`` into
    ``logprobs`` [rows] (``_raw_logprob``'s value), and returns its rank [rows] and the ``k`` largest
    raw log-probabilities [rows, k] with their token ids, ties in token order (``ops.top_logprobs``)."""
    rows = logits.shape[0]
    ranks = torch.empty(rows, dtype=torch.int64, device=logits.device)
    top = torch.empty(rows, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(rows, k, dtype=torch.int64, device=logits.device)
    ops.top_logprobs(logits, token_ids, logprobs, ranks, top, ids)
    return ranks, top, ids


def _apply_penalties(logits: torch.Tensor, meta: SamplingMetadata, rows: list[int]) -> None:
    """Penalties of ``rows`` on the tokens each has seen, in place on ``logits`` [num_rows, vocab]
    (contiguous float32): HF's repetition penalty over the prompt and output tokens, then OpenAI's
    frequency and presence penalties over the output tokens. Only those entries are read and written
    (a step's few thousand, not rows x vocab), each with the arithmetic of the dense formulas
    ``where(x > 0, x / r, x * r)`` and ``x - f * count - p * (count > 0)``, which leave the other
    entries as they are."""
    vocab, device = logits.shape[-1], logits.device
    flat = logits.view(-1)
    outputs = torch.tensor([r * vocab + t for r in rows for t in meta.output_token_ids[r]], dtype=torch.int64,
                           device=device)  # (row, token) keys

    def per_row(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in meta.params], device=device)

    if any(meta.params[r].repetition_penalty != 1.0 for r in rows):
        prompts = torch.tensor([r * vocab + t for r in rows if meta.params[r].repetition_penalty != 1.0
                                for t in meta.prompt_token_ids[r]], dtype=torch.int64, device=device)
        seen = torch.unique(torch.cat([outputs, prompts]))
        x = flat[seen]
        penalty = per_row("repetition_penalty")[seen // vocab]
        flat[seen] = torch.where(x > 0, x / penalty, x * penalty)
    if any(meta.params[r].frequency_penalty or meta.params[r].presence_penalty for r in rows):
        keys, counts = torch.unique(outputs, return_counts=True)
        frequency, presence = per_row("frequency_penalty")[keys // vocab], per_row("presence_penalty")[keys // vocab]
        flat[keys] = flat[keys] - frequency * counts.float() - presence * (counts > 0)
