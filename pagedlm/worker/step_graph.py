"""Decode steps replayed from a recording of their op calls: vLLM's CUDA graphs, on the CPU.

A decode step's forward pass makes the same op calls in the same order every time for a given
number of sequences (~9 a layer); only the contents of its inputs change. Issuing them from Python
(module calls, argument parsing, the dispatcher) took ~2.3 ms of a 30-layer SmolLM2 step at batch 8,
a sixth of it (docs/performance.md, session 53). So a decode step of a batch size seen often enough
(``RECORD_AFTER``) runs under ``_Recorder``, which keeps every ``torch.ops.pagedlm`` call with its
arguments; later steps of that size copy their inputs into the recorded input tensors and call the
recorded ops in order, with the same kernels on the same shapes (so the same bits as eager execution).

The recording keeps the tensors the forward pass allocates (activations, q/k/v, MLP rows) as their
sizes and views, not their memory, so a recording step frees them as an eager step does;
``_plan_arena`` lays them out in one byte arena by their live ranges, as a CUDA graph's memory pool
reuses its blocks, so a graph holds about one layer's activations. All graphs share that arena
and one set of input tensors (a step runs one graph at a time).

A forward pass that runs any other compute op (a torch op rather than pagedlm's, as the torch
reference backend does, or oneDNN's matmul) cannot be replayed this way: that batch size stays
eager. Steps with prefill tokens always run eagerly.
"""

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pagedlm.model_executor.layers.attention import AttentionMetadata
from pagedlm.worker.model_input import ModelInput

logger = logging.getLogger("pagedlm")

# torch ops a recorded forward may run besides pagedlm's: allocations (their tensors are planned
# into the arena) and views (no compute; recorded as the tensors they return).
_ALLOCATIONS = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty_strided.default,
}
# A recording step took 30-36 ms where an eager one took 12-14 ms (SmolLM2 at batch 8: ~570 ops
# through a Python dispatch mode), the saving of ~10 replays. So a batch size is recorded at its
# RECORD_AFTER-th decode-only step: one a run passes through in a step or two (the tail of a large
# job, where requests finish one by one) is not recorded for nothing. On AlpacaEval's 805 requests
# 3 beat 1 (2% slower than never recording) and 8 (~2.5% slower than 3; docs/performance.md, session 53).
RECORD_AFTER = 3
_ALIGNMENT = 64  # bytes: a cache line, and every dtype's alignment
_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: ATen runs smaller element-wise ops on the calling thread


def _map_tensors(fn, args: tuple) -> tuple:
    """``args`` with ``fn`` applied to each argument, and to each item of a list (``Tensor[]``)."""
    return tuple(type(x)(map(fn, x)) if isinstance(x, (list, tuple)) else fn(x) for x in args)


def _storage_key(t: object) -> int | None:
    """Where a tensor's bytes start; None for what has no storage (oneDNN's blocked weights) or is no tensor."""
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) and not t.is_mkldnn else None


@dataclass(frozen=True)
class _Allocated:
    """In a recorded call, a view of the ``index``-th storage the recorded forward pass allocated."""

    index: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


def _allocations(args: tuple) -> list[int]:
    """The allocation indices a recorded call's arguments (lists included) use."""
    flat = [y for x in args for y in (x if isinstance(x, (list, tuple)) else (x,))]
    return [x.index for x in flat if isinstance(x, _Allocated)]


class _Recorder(TorchDispatchMode):
    """Runs every op as usual, keeping the pagedlm op calls in order with the tensors allocated on
    the way as ``_Allocated`` (``nbytes``: each allocation's size), so that the recording holds no
    activation and the step's memory is the eager step's; ``blocked_by`` names the first other
    compute op (the recording is then unusable).

    An allocation is told by where its bytes start: a storage freed during the pass may give its
    address to a later allocation, which then takes the address over. Nothing else can reach the
    address meanwhile: the tensors from before the pass (weights, inputs, the KV cache) stay alive,
    and pagedlm's ops return no tensor (their outputs are arguments)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # torch would wrap __torch_dispatch__ in dynamo's disable, importing dynamo and triton (~0.5 s)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple]] = []
        self.nbytes: list[int] = []
        self._allocated_at: dict[int, int] = {}  # storage key -> index of the allocation there now
        self.blocked_by: str | None = None

    def template(self, x: object) -> object:
        """``x`` as ``_Allocated`` where it is a view of a storage the pass allocated, else itself."""
        index = self._allocated_at.get(_storage_key(x))
        if index is None:
            return x
        return _Allocated(index, x.dtype, tuple(x.size()), tuple(x.stride()), x.storage_offset())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "pagedlm":
            # Keyword arguments in schema order, so that a call is its positional arguments.
            schema_args = func._schema.arguments
            call = (*args, *(kwargs[a.name] if a.name in kwargs else a.default_value for a in schema_args[len(args):]))
            self.calls.append((func, _map_tensors(self.template, call)))
        elif func in _ALLOCATIONS:
            self._allocated_at[_storage_key(out)] = len(self.nbytes)
            self.nbytes.append(out.untyped_storage().nbytes())
        elif not func.is_view and self.blocked_by is None:
            self.blocked_by = str(func)
        return out


@dataclass(frozen=True)
class _ArenaView:
    """A tensor of the recording placed in the arena: ``offset`` bytes in, with its own view."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    def bind(self, arena: torch.Tensor) -> torch.Tensor:
        # as_strided's offset counts from the start of the arena's storage, in elements of dtype.
        base = arena[self.offset : self.offset + self.nbytes].view(self.dtype)
        return base.as_strided(self.size, self.stride, self.offset // base.element_size() + self.storage_offset)


def _plan_arena(calls: list[tuple], nbytes: list[int], output: object) -> tuple[dict[int, int], int]:
    """Byte offsets for the allocations the calls use (allocation index -> offset) and the arena's
    size: two allocations share bytes only where their live ranges (first to last call that takes
    a view of them; the output's to the end) do not overlap. First fit, in order of first use."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, (_, args) in enumerate(calls):
        for index in _allocations(args):
            first.setdefault(index, i)
            last[index] = i
    for index in _allocations((output,)):
        first.setdefault(index, len(calls))
        last[index] = len(calls)
    offsets: dict[int, int] = {}
    live: list[tuple[int, int, int]] = []  # (offset, end, last use)
    size = 0
    for index in sorted(first, key=first.get):
        live = sorted(x for x in live if x[2] >= first[index])
        size_needed = -(-nbytes[index] // _ALIGNMENT) * _ALIGNMENT
        offset = 0
        for start, end, _ in live:
            if start - offset >= size_needed:
                break
            offset = max(offset, end)
        offsets[index] = offset
        live.append((offset, offset + size_needed, last[index]))
        size = max(size, offset + size_needed)
    return offsets, size


class StepGraph:
    """One recorded decode forward pass of ``num_seqs`` sequences, its allocations in the arena."""

    def __init__(self, num_seqs: int, calls: list[tuple], output: object, nbytes: list[int],
                 offsets: dict[int, int]) -> None:
        self.num_seqs = num_seqs

        def place(x: object) -> object:
            if isinstance(x, _Allocated):
                return _ArenaView(offsets[x.index], nbytes[x.index], x.dtype, x.size, x.stride, x.storage_offset)
            return x

        self._calls = [(op._schema, _map_tensors(place, args)) for op, args in calls]
        self._output = place(output)
        self._program = None  # and the output's tensor: made by bind
        self.output: torch.Tensor | None = None

    def bind(self, arena: torch.Tensor) -> None:
        """Points the recorded calls at ``arena`` (again after it grew), as a ``pagedlm::OpProgram``
        (csrc/op_program.cpp) that replays them without Python in between."""
        views: dict[_ArenaView, torch.Tensor] = {}

        def bound(x: object) -> object:
            if isinstance(x, _ArenaView):
                return views.setdefault(x, x.bind(arena))
            return x

        self._program = torch.classes.pagedlm.OpProgram()
        for schema, args in self._calls:
            self._program.add(schema.name, schema.overload_name, list(_map_tensors(bound, args)))
        self.output = bound(self._output)

    def replay(self) -> torch.Tensor:
        self._program.run()
        return self.output


class StepGraphs:
    """The recorded decode steps of one model and KV cache, by batch size (up to ``max_num_seqs``),
    with the input tensors and the arena they share. ``forward`` takes a decode-only step's inputs."""

    def __init__(self, model: torch.nn.Module, kv_caches: list, max_num_seqs: int, max_blocks_per_seq: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_num_seqs = max_num_seqs
        self.graphs: dict[int, StepGraph | None] = {}  # None: that batch size runs eagerly
        self.eager_steps: Counter[int] = Counter()  # decode-only steps run eagerly, by batch size
        self.arena = torch.empty(0, dtype=torch.uint8, device=device)

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids = zeros(max_num_seqs, dtype=torch.int64)
        self.positions = zeros(max_num_seqs, dtype=torch.int64)
        self.slot_mapping = zeros(max_num_seqs, dtype=torch.int64)
        self.seq_lens = zeros(max_num_seqs, dtype=torch.int32)
        self.block_tables = zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32)
        self.no_prefill = (zeros(1, dtype=torch.int32), zeros(0, dtype=torch.int32), zeros(0, 0, dtype=torch.int32))

    def forward(self, model_input: ModelInput) -> torch.Tensor:
        """The model's hidden states ``[num_seqs, hidden]`` for a step of ``num_seqs`` decodes (no
        prefill tokens), replayed where that batch size was recorded (the tensor is then the arena's
        and holds until the next step). A batch size's ``RECORD_AFTER``-th step is recorded."""
        n = model_input.input_ids.shape[0]
        graph = self.graphs.get(n)
        if graph is None:
            self.eager_steps[n] += 1
            if n in self.graphs or self.eager_steps[n] < RECORD_AFTER:
                return self.model(model_input.input_ids, model_input.positions, self.kv_caches,
                                  model_input.attn_metadata)
        self._set_inputs(model_input)
        return graph.replay() if graph is not None else self._record(n)

    def _set_inputs(self, model_input: ModelInput) -> None:
        meta = model_input.attn_metadata
        n, width = meta.decode_block_tables.shape
        self.input_ids[:n].copy_(model_input.input_ids)
        self.positions[:n].copy_(model_input.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        # In pieces under ATen's grain size: a larger copy opens an OpenMP region, whose threads would
        # then spin beside the kernels' pool (tests/test_openmp.py).
        rows = max(1, _GRAIN_SIZE // max(width, 1))
        for first in range(0, n, rows):
            end = min(first + rows, n)
            self.block_tables[first:end, :width].copy_(meta.decode_block_tables[first:end])

    def _record(self, n: int) -> torch.Tensor:
        """Runs the step on the input tensors under the recorder and keeps the recording, if it is one."""
        recorder = _Recorder()
        with recorder:
            hidden = self._run(n)
        if recorder.blocked_by is not None:
            logger.info("Decode steps of %d sequences run eagerly: the forward pass runs %s, which is not a pagedlm op.",
                        n, recorder.blocked_by)
            self.graphs[n] = None
            return hidden
        output = recorder.template(hidden)
        offsets, size = _plan_arena(recorder.calls, recorder.nbytes, output)
        graph = StepGraph(n, recorder.calls, output, recorder.nbytes, offsets)
        if size > self.arena.numel():
            # Activations grow with the batch: room for max_num_seqs rows at once, not one growth a size.
            self.arena = torch.empty(max(size, size * self.max_num_seqs // n), dtype=torch.uint8, device=self.arena.device)
            for g in self.graphs.values():
                if g is not None:
                    g.bind(self.arena)
        graph.bind(self.arena)
        self.graphs[n] = graph
        return hidden

    def _run(self, n: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            num_prefill_tokens=0,
            prefill_cu_seqlens_q=self.no_prefill[0],
            prefill_seq_lens=self.no_prefill[1],
            prefill_block_tables=self.no_prefill[2],
            decode_seq_lens=self.seq_lens[:n],
            decode_block_tables=self.block_tables[:n],
        )
        return self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, meta)
