"""The worker's step-input builder and sampled rows, without a model (as vLLM's
tests/worker/test_model_runner.py): the metadata the engine hands over, turned into tensors."""

import torch

from pagedlm import SamplingParams
from pagedlm.model_executor.layers.sampler import Sampler
from pagedlm.step import SequenceData, SequenceGroupMetadata, SequenceGroupOutput
from pagedlm.worker.model_input import prepare_model_input
from pagedlm.worker.model_runner import ModelRunner

BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0)


def _metadata(request_id: str, *seqs: SequenceData, params: SamplingParams = GREEDY) -> SequenceGroupMetadata:
    return SequenceGroupMetadata(request_id, params, list(seqs))


def test_prefills_come_first_with_their_positions_slots_and_tables():
    decode = SequenceData(seq_id=1, prompt_token_ids=[11, 12, 13, 14, 15], output_token_ids=[16, 17, 18, 19, 20],
                          num_computed_tokens=9, token_chunk_size=1, block_table=[2, 5, 8], num_samples=1)
    # Positions 4..9 of a 12-token prompt: the second half of block 3 is shared with nothing.
    prefill = SequenceData(seq_id=2, prompt_token_ids=list(range(100, 112)), output_token_ids=[],
                           num_computed_tokens=4, token_chunk_size=6, block_table=[7, 3, 9])
    model_input = prepare_model_input([_metadata("d", decode), _metadata("p", prefill)], BLOCK_SIZE, torch.device("cpu"))
    assert [(e.group_index, e.seq.seq_id, e.last_row) for e in model_input.entries] == [(1, 2, 5), (0, 1, 6)]
    assert model_input.input_ids.tolist() == list(range(104, 110)) + [20]
    assert model_input.positions.tolist() == [4, 5, 6, 7, 8, 9, 9]
    meta = model_input.attn_metadata
    # Position p of a sequence lives in block_table[p // 4] at offset p % 4.
    assert meta.slot_mapping.tolist() == [3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0, 9 * 4 + 1, 8 * 4 + 1]
    assert meta.num_prefill_tokens == 6
    assert meta.prefill_cu_seqlens_q.tolist() == [0, 6] and meta.prefill_seq_lens.tolist() == [10]
    assert meta.prefill_block_tables.tolist() == [[7, 3, 9]]
    assert meta.decode_seq_lens.tolist() == [10] and meta.decode_block_tables.tolist() == [[2, 5, 8]]
    assert meta.slot_mapping.dtype == torch.int64 and meta.decode_block_tables.dtype == torch.int32


def test_block_tables_are_padded_to_the_widest():
    a = SequenceData(1, [1, 2, 3, 4, 5], [], 0, 5, [4, 6])
    b = SequenceData(2, [1, 2], [], 0, 2, [9])
    meta = prepare_model_input([_metadata("a", a), _metadata("b", b)], BLOCK_SIZE, torch.device("cpu")).attn_metadata
    assert meta.prefill_block_tables.tolist() == [[4, 6], [9, 0]]
    assert meta.prefill_cu_seqlens_q.tolist() == [0, 5, 7] and meta.prefill_seq_lens.tolist() == [5, 2]


class _RowEcho(torch.nn.Module):
    """A stand-in model head: the logits of a hidden row are the row itself, so a greedy sample
    names the row it was drawn from."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _runner(vocab: int) -> ModelRunner:
    runner = ModelRunner.__new__(ModelRunner)
    runner.device = torch.device("cpu")
    runner.vocab_size = vocab
    runner.model = _RowEcho()
    runner.sampler = Sampler()
    return runner


def test_sampled_rows_fan_out_bans_and_beam_rows():
    vocab = 16
    # Row r of the step has its maximum at token r (and its second best at token r + 8).
    hidden = torch.full((8, vocab), -5.0)
    hidden[torch.arange(8), torch.arange(8)] = 5.0
    hidden[torch.arange(8), torch.arange(8) + 8] = 4.0
    prefill = SequenceData(1, list(range(5)), [], 0, 5, [0, 1], num_samples=3)  # rows 0..4, samples row 4
    banned = SequenceData(2, [1], [3], 1, 1, [2], num_samples=1, banned_token_ids=(5,))  # row 5
    chunk = SequenceData(3, list(range(9)), [], 0, 1, [3, 4, 5])  # row 6: a chunk that does not sample
    beam = SequenceData(4, [1], [2, 3], 2, 1, [6], num_samples=1)  # row 7
    metadata = [
        _metadata("fan", prefill, params=SamplingParams(temperature=0.0)),
        _metadata("ban", banned, params=SamplingParams(temperature=0, min_tokens=2)),
        _metadata("chunk", chunk),
        _metadata("beam", beam, params=SamplingParams(n=2, use_beam_search=True, temperature=0)),
    ]
    model_input = prepare_model_input(metadata, BLOCK_SIZE, torch.device("cpu"))
    outputs = [SequenceGroupOutput() for _ in metadata]
    runner = _runner(vocab)
    runner._sample(metadata, [e for e in model_input.entries if e.seq.num_samples], hidden, outputs)
    # The fan-out draws three samples from the prompt's last row (4), all for the one parent.
    assert [(s.parent_seq_id, s.token_id) for s in outputs[0].samples] == [(1, 4)] * 3
    # Token 5 is banned (min_tokens not reached), so row 5 yields its second best.
    assert [(s.parent_seq_id, s.token_id) for s in outputs[1].samples] == [(2, 13)]
    assert outputs[2].samples == [] and outputs[2].beam_logprobs is None
    assert [(s.parent_seq_id, s.token_id) for s in outputs[3].samples] == [(4, 7)]
    expected = torch.log_softmax(hidden[7:8], dim=-1)
    torch.testing.assert_close(outputs[3].beam_logprobs, expected)
    assert outputs[0].beam_logprobs is None
