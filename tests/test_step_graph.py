"""Replayed decode steps (pagedlm/worker/step_graph.py): the same tokens and log-probabilities as
running every step eagerly, on every architecture and in both dtypes, across batch sizes that
change as requests finish; the arena's plan; eager fallback where a forward pass runs a torch op."""

import logging
import weakref

import pytest
import torch

from conftest import VOCAB_SIZE
from pagedlm import LLM, BeamSearchParams, SamplingParams, ops
from pagedlm.worker import step_graph
from pagedlm.worker.step_graph import _Allocated, _plan_arena

pytestmark = pytest.mark.skipif(ops.backend_for("cpu") != "cpu", reason="steps are replayed on pagedlm's CPU kernels")



@pytest.fixture(autouse=True)
def record_at_once(monkeypatch):
    """Each batch size is recorded at its first decode-only step (the tests' sizes last a few steps)."""
    monkeypatch.setattr(step_graph, "RECORD_AFTER", 1)


PROMPTS = [[(7 * i + 3 * j) % (VOCAB_SIZE - 3) + 3 for j in range(5 + 11 * i)] for i in range(6)]


def _params(logprobs: int | None = 2) -> list[SamplingParams]:
    # Different lengths: requests finish one by one, so decode steps of 6, 5, ... 1 sequences.
    return [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True, logprobs=logprobs)
            for i in range(len(PROMPTS))]


def _results(llm: LLM, params: list[SamplingParams]) -> list[tuple]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(c.token_ids, c.logprobs, c.cumulative_logprob) for o in outs for c in o.outputs]


def _recorded_sizes(llm: LLM) -> list[int]:
    return sorted(n for n, graph in llm.llm_engine.model_runner.step_graphs.graphs.items() if graph is not None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replayed_steps_match_eager_steps(model_dir, dtype):
    eager = LLM(model_dir, dtype=dtype, enforce_eager=True)
    assert eager.llm_engine.model_runner.step_graphs is None
    expected = _results(eager, _params())
    llm = LLM(model_dir, dtype=dtype)
    assert _results(llm, _params()) == expected  # sizes recorded on first use
    assert _recorded_sizes(llm) == [1, 2, 3, 4, 5, 6]
    assert _results(llm, _params()) == expected  # and replayed


def test_sampled_and_beam_steps_match_eager(llama_dir):
    """Seeded sampling, n > 1 (sibling sequences share blocks: copy-on-write between steps) and
    beam search read the replayed hidden states as they do eager ones."""
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, n=2, max_tokens=9, logprobs=1) for i in range(3)]
    params += [SamplingParams(temperature=0, max_tokens=6, logprobs=3) for _ in range(3)]
    expected = _results(LLM(llama_dir, enforce_eager=True), params)
    llm = LLM(llama_dir)
    assert _results(llm, params) == expected
    assert _recorded_sizes(llm)
    beams = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    beam = BeamSearchParams(beam_width=3, max_tokens=5)
    eager_beams = LLM(llama_dir, enforce_eager=True).beam_search(beams, beam)
    assert [s.tokens for o in llm.beam_search(beams, beam) for s in o.sequences] == \
        [s.tokens for o in eager_beams for s in o.sequences]


def test_fp8_kv_scales_calibrated_before_recording(llama_dir):
    """With calculate_kv_scales the first step sets each layer's scales; no step records before
    that (a recording keeps the scales it was made with)."""
    kwargs = dict(dtype="bfloat16", kv_cache_dtype="fp8_e4m3", calculate_kv_scales=True)
    expected = _results(LLM(llama_dir, enforce_eager=True, **kwargs), _params())
    llm = LLM(llama_dir, **kwargs)
    assert _results(llm, _params()) == expected
    assert _recorded_sizes(llm) == [1, 2, 3, 4, 5, 6]


def test_a_forward_pass_running_a_torch_op_stays_eager(llama_dir, caplog):
    """A model whose decode forward pass runs a torch compute op (here an extra in-place add of
    zero after the final norm) cannot be replayed op by op: its steps run eagerly, correctly."""
    expected = _results(LLM(llama_dir, enforce_eager=True), _params())
    llm = LLM(llama_dir)
    model = llm.llm_engine.model_runner.model
    norm_forward = model.norm.forward
    model.norm.forward = lambda x, residual=None: tuple(t.add_(0) for t in norm_forward(x, residual))
    with caplog.at_level(logging.INFO, logger="pagedlm"):
        assert _results(llm, _params()) == expected
    graphs = llm.llm_engine.model_runner.step_graphs.graphs
    assert graphs and all(g is None for g in graphs.values())
    assert "aten.add_.Tensor, which is not a pagedlm op" in caplog.text


def test_enforce_eager_is_checked(llama_dir):
    with pytest.raises(ValueError, match="enforce_eager must be True or False, got 'yes'"):
        LLM(llama_dir, enforce_eager="yes")


def _call(*args):
    return (torch.ops.pagedlm.scale.default, args)


def _allocated(index: int, numel: int) -> _Allocated:
    return _Allocated(index, torch.float32, (numel,), (1,), 0)


def test_arena_plan_shares_bytes_only_between_disjoint_live_ranges():
    nbytes = [40, 400, 40, 80]  # allocations a, b, c, d (float32 of 10, 100, 10, 20)
    a, b, c, d = (_allocated(i, n // 4) for i, n in enumerate(nbytes))
    weight = torch.empty(5)  # not allocated by the forward pass: not planned
    # a: calls 0-1, b: 1-2, c: 2-3 (after a ended: may take a's bytes), d: the output, 3 to the end.
    calls = [_call(a, weight), _call(a, b), _call([b], c), _call(c, d)]
    offsets, size = _plan_arena(calls, nbytes, d)
    assert sorted(offsets) == [0, 1, 2, 3]
    spans = {i: (offsets[i], offsets[i] + nbytes[i]) for i in range(4)}
    live = {0: (0, 1), 1: (1, 2), 2: (2, 3), 3: (3, 4)}
    for x in range(4):
        assert offsets[x] % 64 == 0
        for y in range(x + 1, 4):
            if live[x][1] >= live[y][0] and live[y][1] >= live[x][0]:
                assert spans[x][1] <= spans[y][0] or spans[y][1] <= spans[x][0], (x, y, spans)
    assert offsets[2] == offsets[0]  # a is dead when c is first used
    end = max(end for _, end in spans.values())
    assert size == end + (-end % 64)


def test_recording_frees_what_the_forward_pass_frees():
    """A recording keeps an allocation as its size and views: the step frees its activations as an
    eager step does, and an address a freed tensor gave back is a new allocation when reused."""
    dead, rows, x = [], torch.arange(4), torch.ones(4, 8)

    def forward(x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            y = torch.empty_like(x)
            torch.ops.pagedlm.gather_rows(y, x, rows)
            torch.ops.pagedlm.scale(y, 2.0)
            dead.append(weakref.ref(y))
            x = y
        return x

    recorder = step_graph._Recorder()
    with recorder:
        out = forward(x)
    assert recorder.blocked_by is None
    assert [ref() is None for ref in dead] == [True, True, False]  # the last one is the output
    indices = [[a.index for a in args if isinstance(a, _Allocated)] for _, args in recorder.calls]
    assert indices == [[0], [0], [1, 0], [1], [2, 1], [2]]
    assert recorder.template(out) == _Allocated(2, torch.float32, (4, 8), (8, 1), 0)
    assert recorder.nbytes == [128, 128, 128]


@pytest.mark.parametrize("flags, recorded", [([], True), (["--enforce-eager"], False)])
def test_job_enforce_eager_flag(llama_dir, tmp_path, monkeypatch, flags, recorded):
    from pagedlm.entrypoints.cli import run_main

    made, bind = [], step_graph.StepGraph.bind
    monkeypatch.setattr(step_graph.StepGraph, "bind", lambda self, arena: made.append(self.num_seqs) or bind(self, arena))
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(f'{{"id": {i}, "prompt": "hello {i}"}}\n' for i in range(3)))
    assert run_main(["--model", llama_dir, "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                     "--max-tokens", "4", *flags]) == 0
    assert bool(made) == recorded
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 3


def test_a_batch_size_is_recorded_at_its_record_after_th_step(llama_dir, monkeypatch):
    """Sizes a run passes through in fewer decode-only steps than RECORD_AFTER stay eager; one that
    lasts is recorded at that step and replayed after it."""
    monkeypatch.setattr(step_graph, "RECORD_AFTER", 4)
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=1),  # 2 steps of 2 decodes
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)]  # then 7 of 1
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    expected = LLM(llama_dir, enforce_eager=True).generate(prompts, params, use_tqdm=False)
    llm = LLM(llama_dir)
    graphs = llm.llm_engine.model_runner.step_graphs
    replays = []
    monkeypatch.setattr(step_graph.StepGraph, "replay",
                        lambda self, replay=step_graph.StepGraph.replay: replays.append(self.num_seqs) or replay(self))
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert [o.outputs[0].logprobs for o in outs] == [o.outputs[0].logprobs for o in expected]
    assert dict(graphs.eager_steps) == {2: 2, 1: 4} and list(graphs.graphs) == [1]
    assert replays == [1] * 3  # steps 5-7 of one sequence; step 4 was the recording


def test_op_program_replays_calls_in_order():
    x = torch.ones(4, dtype=torch.float32)
    program = torch.classes.pagedlm.OpProgram()
    program.add("pagedlm::scale", "", [x, 3, False])  # an int factor is taken as a float
    program.add("pagedlm::scale", "", [x, 2.0, True])
    assert len(program) == 2
    program.run()
    program.run()
    assert torch.equal(x, torch.full((4,), 2.25))  # (1 * 3 / 2) * 3 / 2
    with pytest.raises(RuntimeError, match="pagedlm::scale takes 3 arguments, got 2"):
        program.add("pagedlm::scale", "", [x, 2.0])
    with pytest.raises(RuntimeError, match="pagedlm::no_such_op"):
        program.add("pagedlm::no_such_op", "", [x])
    bad = torch.classes.pagedlm.OpProgram()
    bad.add("pagedlm::scale", "", [x, 0.0, False])  # checked when it runs, as a Python call would be
    with pytest.raises(RuntimeError, match="factor"):
        bad.run()


def test_a_module_patched_before_the_first_step_is_recorded_with_the_patch(llama_dir):
    """A wrapped ``forward`` (DirectCall's advice for hooks) that calls an op, here with a numpy
    scalar: recorded as the dispatcher received it (a float), replayed with the patch."""
    np = pytest.importorskip("numpy")

    def patched(llm: LLM) -> LLM:
        model = llm.llm_engine.model_runner.model
        norm_forward = model.norm.forward

        def forward(x, residual=None):
            out, residual = norm_forward(x, residual)
            ops.scale(out, np.float32(0.5))
            return out, residual

        model.norm.forward = forward
        return llm

    expected = _results(patched(LLM(llama_dir, enforce_eager=True)), _params())
    assert expected != _results(LLM(llama_dir, enforce_eager=True), _params())
    llm = patched(LLM(llama_dir))
    assert _results(llm, _params()) == expected
    assert _recorded_sizes(llm) == [1, 2, 3, 4, 5, 6]
