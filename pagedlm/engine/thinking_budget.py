"""vLLM's ``thinking_token_budget``: once a sequence has thought that many tokens, the end of its
reasoning is forced.

A thinking section opens with the reasoning start tokens (``ReasoningConfig``'s; ``<think>`` for
Qwen3), in the prompt (a chat template that opens it) or the output, and closes with the end
tokens. Once an open section holds ``budget`` tokens, the next tokens are those of the configured
end string, one a step, each the only token the sampler may take; the section is then closed, and
a later one has the budget afresh (vLLM's ``ThinkingBudgetStateHolder``). What is counted and
forced depends on the tokens alone, so recompute after preemption forces the same tokens.
"""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from pagedlm.config import REASONING_PARSERS, ReasoningConfig


@dataclass(frozen=True, slots=True)
class ReasoningTokens:
    """A ``ReasoningConfig``'s strings as token ids."""

    start: tuple[int, ...]
    end: tuple[int, ...]  # forced when the budget runs out
    # What closes a section the model ends itself: the parser's end marker, where ``end`` may lead
    # with a transition phrase (vLLM's natural_reasoning_end_token_ids); ``end`` without a parser.
    natural_end: tuple[int, ...] = ()

    @classmethod
    def of(cls, config: ReasoningConfig, tokenizer: PreTrainedTokenizerBase) -> "ReasoningTokens":
        """Raises ValueError where a string encodes to no tokens."""
        # The parser's marker, where the end string is it or ends with it (a string of one's own
        # that does not is its own natural end: found by a review).
        marker = REASONING_PARSERS[config.reasoning_parser][1] if config.reasoning_parser else ""
        natural = marker if marker and config.reasoning_end_str.endswith(marker) else config.reasoning_end_str
        start, end, natural_end = (tuple(tokenizer.encode(text, add_special_tokens=False))
                                   for text in (config.reasoning_start_str, config.reasoning_end_str, natural))
        if not (start and end and natural_end):
            raise ValueError(f"reasoning_config: the tokenizer encodes reasoning_start_str "
                             f"{config.reasoning_start_str!r} to {list(start)} and reasoning_end_str "
                             f"{config.reasoning_end_str!r} to {list(end)}; both need tokens.")
        return cls(start, end, natural_end)

    @property
    def closing(self) -> tuple[int, ...]:
        """What closes a section outside forcing (``end`` where built without ``natural_end``)."""
        return self.natural_end or self.end


@dataclass(slots=True)
class ThinkingBudget:
    """One sequence's thinking section and what it must take next."""

    budget: int
    tokens: ReasoningTokens
    count: int | None  # tokens in the open section; None while none is open
    tail: tuple[int, ...]  # the last tokens, enough to see a start or end sequence complete
    forced: int = 0  # end tokens taken so far under forcing (0: not forcing)

    @classmethod
    def for_prompt(cls, budget: int, tokens: ReasoningTokens, prompt_token_ids: list[int]) -> "ThinkingBudget":
        """The state after the prompt: a section is open where the prompt's last start sequence
        comes after its last closing one (found by a hunt: with a transition phrase in the end
        string, a section the model closed with the parser's own marker was still open)."""
        start, end = _last_index(prompt_token_ids, tokens.start), _last_index(prompt_token_ids, tokens.closing)
        count = len(prompt_token_ids) - start - len(tokens.start) if start > end else None
        return cls(budget, tokens, count, tuple(prompt_token_ids[-_width(tokens):]))

    def forced_token(self) -> int | None:
        """The token the next step must take, or None."""
        if self.forced:
            return self.tokens.end[self.forced]
        if self.count is not None and self.count >= self.budget:
            return self.tokens.end[0]
        return None

    def append(self, token_id: int) -> None:
        """Take the sequence's next token."""
        forcing = self.forced or (self.count is not None and self.count >= self.budget)
        self.tail = (self.tail + (token_id,))[-_width(self.tokens):]
        if forcing:
            self.forced += 1
            if self.forced == len(self.tokens.end):
                self.forced, self.count = 0, None
        elif self.tail[-len(self.tokens.closing):] == self.tokens.closing:
            self.count = None
        elif self.count is None and self.tail[-len(self.tokens.start):] == self.tokens.start:
            self.count = 0  # a start inside an open section does not restart it (vLLM's V1 count)
        elif self.count is not None:
            self.count += 1


def _width(tokens: ReasoningTokens) -> int:
    """How many last tokens show a start or closing sequence complete."""
    return max(len(tokens.start), len(tokens.closing))


def _last_index(token_ids: list[int], pattern: tuple[int, ...]) -> int:
    """Where ``pattern`` last begins in ``token_ids``, or -1."""
    n = len(pattern)
    for i in range(len(token_ids) - n, -1, -1):
        if token_ids[i] == pattern[0] and tuple(token_ids[i:i + n]) == pattern:
            return i
    return -1
