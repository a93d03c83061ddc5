"""Beam search with Hugging Face's semantics (``generate(num_beams=k, do_sample=False)``).

Each step the group's running beams (``k`` sequences sharing KV blocks) propose their top
continuations; the best ``k`` that do not end become the next beams (the engine forks and frees
sequences accordingly, so shared prefixes stay shared by copy-on-write), and those that end in the
first ``k`` places become finished hypotheses, scored ``logprob_sum / length ** length_penalty``.
Under a structured-outputs grammar, candidates its mask removed (-inf) are dropped: Hugging Face
keeps them as beams that can never win, but such a beam has left the grammar (and the search may
then return fewer than ``k``, when the grammar allows fewer outputs).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedlm.logprobs import SampleLogprobs
from pagedlm.sampling_params import SamplingParams

_NEG = -1.0e9


@dataclass
class BeamHypothesis:
    token_ids: list[int]
    cumulative_logprob: float  # the model's, as sampling reports it
    score: float  # length-penalised, from the processed log-probabilities
    stopped: bool  # ended on a stop token (else at the length limit)
    logprobs: SampleLogprobs  # one dict per token when ``logprobs`` is asked for, else empty


@dataclass
class BeamCandidate:
    parent: int  # row of the running beam it extends
    token_id: int
    score: float  # sum of processed log-probabilities, what beams are ranked by
    cumulative_logprob: float  # sum of the model's log-probabilities


@dataclass
class BeamSearchState:
    params: SamplingParams
    max_new_tokens: int
    constrained: bool = False  # a grammar's mask: candidates at -inf are dropped
    finished: list[BeamHypothesis] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)  # running beam's seq_id -> its ranking score
    improvable: bool = True
    done: bool = False

    @property
    def width(self) -> int:
        return self.params.best_of

    def step(
        self,
        output_token_ids: list[list[int]],
        scores: list[float],
        logprobs: torch.Tensor,
        cumulative_logprobs: list[float],
        raw_logprobs: torch.Tensor,
        stop_token_ids: frozenset[int],
        logprobs_of: Callable[[int, int], SampleLogprobs] | None = None,
    ) -> list[BeamCandidate]:
        """Advance by one token. ``logprobs`` [beams, V] are the running beams' next-token
        log-probabilities after logits processing, which with ``scores`` rank the beams;
        ``raw_logprobs`` are the model's, which with ``cumulative_logprobs`` are reported.
        ``logprobs_of(beam, token_id)``, when given, is the reported logprob dicts of beam ``beam``
        extended by ``token_id``, kept with each finished hypothesis. Returns the next running
        beams, best first (empty when done)."""
        k, lp = self.width, self.params.length_penalty
        num_generated = len(output_token_ids[0]) + 1
        vocab = logprobs.shape[-1]
        totals = logprobs + torch.tensor(scores, dtype=logprobs.dtype, device=logprobs.device)[:, None]
        # Hugging Face's candidate count, its EOS ids being every token that ends a beam here (a hunt:
        # counting the EOS ids alone, stop_token_ids could end every candidate and the search with them).
        num_candidates = max(2, 1 + len(stop_token_ids)) * k
        top_scores, top_ids = totals.view(-1).topk(min(num_candidates, totals.numel()))
        raw = raw_logprobs.reshape(-1)[top_ids].tolist()
        candidates = [
            BeamCandidate(i // vocab, i % vocab, s, cumulative_logprobs[i // vocab] + r)
            for i, s, r in zip(top_ids.tolist(), top_scores.tolist(), raw)
            if not (self.constrained and s == float("-inf"))
        ]
        at_max_len = num_generated >= self.max_new_tokens
        ends = [at_max_len or c.token_id in stop_token_ids for c in candidates]

        accepting = self.improvable and not (len(self.finished) == k and self.params.early_stopping is True)
        if accepting:
            for c, end in zip(candidates[:k], ends[:k]):
                if end:
                    tokens = output_token_ids[c.parent] + [c.token_id]
                    score = _length_penalised(c.score, num_generated, lp)
                    reported = logprobs_of(c.parent, c.token_id) if logprobs_of else []
                    self.finished.append(BeamHypothesis(tokens, c.cumulative_logprob, score, c.token_id in stop_token_ids,
                                                        reported))
            self.finished = sorted(self.finished, key=lambda h: h.score, reverse=True)[:k]

        running = [c for c, end in zip(candidates, ends) if not end][:k]
        if len(self.finished) == k:
            best_len = num_generated
            if self.params.early_stopping == "never" and lp > 0:
                best_len = self.max_new_tokens
            best_running = running[0].score if running else _NEG
            self.improvable &= _length_penalised(best_running, best_len, lp) > self.finished[-1].score
        full_and_eager = len(self.finished) == k and self.params.early_stopping is True
        self.done = not self.improvable or full_and_eager or not running
        return [] if self.done else running


def _length_penalised(logprob: float, length: int, length_penalty: float) -> float:
    """``logprob / length ** length_penalty`` in IEEE arithmetic: a large penalty gives 0 or -inf
    where Python's floats would raise OverflowError or ZeroDivisionError."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return float(np.float64(logprob) / np.float64(length) ** length_penalty)
