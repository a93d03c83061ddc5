"""The token embedding: a ``[vocab_size, hidden_size]`` table whose rows ``ops.gather_rows`` looks up."""

import torch
from torch import nn

from pagedlm import ops
from pagedlm.model_executor.layers.direct_call import DirectCall


class Embedding(DirectCall, nn.Module):
    """``nn.Embedding``'s lookup (same ``weight`` parameter, so checkpoints and tied LM heads load as
    before) without its OpenMP region on CPU (see ``ops.gather_rows``).

    forward: ``input_ids`` int64 ``[num_tokens]`` -> ``[num_tokens, hidden_size]`` in the weight's dtype;
    raises for an id outside ``[0, vocab_size)`` (RuntimeError; IndexError on the torch-reference
    backend)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.weight.new_empty(input_ids.shape[0], self.weight.shape[1])
        ops.gather_rows(out, self.weight, input_ids)
        return out
