"""OpenMP settings: the wait policy set at import, threads within a cgroup CPU quota, MKL's vector math
initialised before a parallel region calls it, no OpenMP region of torch's in a bf16 step on AMX
(Llama, Granite, Gemma 2, Qwen3, Gemma 3)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from pagedlm import LLM, SamplingParams, openmp
from pagedlm.model_executor.layers.linear import Linear
from conftest import make_checkpoint


def _run(code: str, **env: str) -> tuple[str, str]:
    """stdout, and the spin count libgomp took (OMP_DISPLAY_ENV=verbose prints it when it loads)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, "OMP_DISPLAY_ENV": "verbose", **env},
                          capture_output=True, text=True, check=True)
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr)
    return done.stdout.strip(), spin and spin.group(1)


def test_wait_policy_is_set_only_when_it_can_take_effect_and_not_passed_on():
    show = "import os; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert openmp.OMP_WAIT_POLICY == "passive"
    # libgomp took passive (no spinning), and the variable is gone again for child processes.
    assert _run(f"import pagedlm; {show}") == ("None", "0")
    child = "import os, subprocess, sys; subprocess.run([sys.executable, '-c', \"import os; print(os.environ.get('OMP_WAIT_POLICY'))\"])"
    assert _run(f"import pagedlm; {child}")[0] == "None"
    assert _run(f"import torch, pagedlm; {show}") == ("None", "300000")  # libgomp had read its environment
    assert _run(f"import pagedlm; {show}", OMP_WAIT_POLICY="active")[0] == "active"
    assert _run(f"import pagedlm; {show}", GOMP_SPINCOUNT="5") == ("None", "5")


def test_the_first_parallel_float32_tanh_is_as_exact_as_the_others():
    # MKL's vector math initialises itself lazily and races when first called from two threads: in
    # about one fresh process of four (torch alone), the first tanh was off by up to 5e-5. Ten fresh
    # processes, each running initialize_vector_math (from openmp.py alone, so that nothing else
    # imported first has called the library) and then checking its first parallel tanh against
    # float64 and a second call.
    code = (
        f"import runpy, torch; runpy.run_path({openmp.__file__!r})['initialize_vector_math'](); "
        "torch.set_num_threads(2); "
        "x = torch.randn(3, 2, 3, 1104, generator=torch.Generator().manual_seed(0)) * 1.2; "
        "first, second = torch.tanh(x), torch.tanh(x); "
        "print(torch.equal(first, second), float((first.double() - torch.tanh(x.double())).abs().max()))"
    )
    for _ in range(10):
        same, err = _run(code)[0].split()
        assert same == "True" and float(err) < 1e-7, (same, err)


@pytest.mark.parametrize("files,expected", [
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cpu_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert openmp.cpu_quota(str(tmp_path)) == expected


def test_threads_are_lowered_to_the_quota(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(openmp, "cpu_quota", lambda: 1)
    try:
        torch.set_num_threads(2)
        openmp.limit_threads_to_cpu_quota()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        for chosen in ("2", "+2", " 2,1"):  # the user's choice stands (libgomp reads a sign, a list)
            monkeypatch.setenv("OMP_NUM_THREADS", chosen)
            torch.set_num_threads(2)
            openmp.limit_threads_to_cpu_quota()
            assert torch.get_num_threads() == 2, chosen
        for ignored in ("abc", "0", "-1", ""):  # found by a hunt: libgomp ignores them, and so does the limit now
            monkeypatch.setenv("OMP_NUM_THREADS", ignored)
            torch.set_num_threads(2)
            openmp.limit_threads_to_cpu_quota()
            assert torch.get_num_threads() == 1, ignored
    finally:
        torch.set_num_threads(before)


# Ops that only view, allocate, read one scalar (a size, an address) or draw the per-request uniforms; any other torch op in a step may open
# an OpenMP region, after which libgomp's threads spin beside the kernels' pool (300,000 times when
# torch was imported before pagedlm, so OMP_WAIT_POLICY could not be set: a decode step 25% slower).
_NO_COMPUTE = {"aten::as_strided", "aten::detach", "aten::detach_", "aten::empty", "aten::empty_like", "aten::empty_strided",
               "aten::lift_fresh", "aten::new_empty", "aten::resolve_conj", "aten::resolve_neg", "aten::slice",
               "aten::select", "aten::split_with_sizes", "aten::view", "aten::reshape", "aten::item",
               "aten::_local_scalar_dense", "mkldnn::_nbytes", "mkldnn::data_ptr"}
_SMALL_ONLY = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::rand", "aten::uniform_"}
_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: smaller element-wise ops run without a parallel region
# A float32 soft cap (Gemma 2's final logits) stays ATen's, whose fp32 tanh is transformers'
# (csrc/cpu/scaling.cpp): the one region a float32 step may open.
_FP32_SOFT_CAP = {"aten::div_", "aten::tanh_", "aten::mul_", "aten::mul"}


@pytest.fixture(scope="module", params=["llama", "granite", "gemma", "gemma2", "qwen3", "gemma3", "smollm3", "olmo2"])
def arch_dir(request, tmp_path_factory, tokenizer_dir) -> str:
    """Llama, the models that scale their embeddings, residuals or logits (Granite's multipliers,
    Gemma's normaliser and Gemma 2's final soft cap), those that normalise q and k per head (or over
    all heads: OLMo 2, whose layers also normalise after attention and the MLP), and SmolLM3's layers
    without RoPE."""
    return make_checkpoint(str(tmp_path_factory.mktemp(f"openmp_{request.param}")), request.param, tokenizer_dir)


def _linears_are_ours(dtype: torch.dtype) -> bool:
    """Whether ``Linear`` runs one of pagedlm's kernels here in ``dtype`` (AMX, the FMA kernels, or
    the AVX512-BF16 streaming kernel in oneDNN's order) rather than oneDNN's matmul, which opens
    OpenMP regions."""
    layer = Linear(64, 64, bias=False).to(dtype)
    layer.process_weights_after_loading()
    return layer.runs_own_kernel


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                                    SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
                                    SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2,
                                                   ignore_eos=True)])
def test_a_step_runs_no_torch_compute_op(arch_dir, params, dtype):
    if not _linears_are_ours(getattr(torch, dtype)):
        pytest.skip(f"the {dtype} linears run on oneDNN here, which uses OpenMP")
    llm = LLM(arch_dir, dtype=dtype)
    with open(os.path.join(arch_dir, "config.json")) as f:
        soft_cap_in_fp32 = dtype == "float32" and json.load(f).get("final_logit_softcapping")
    prompts = [{"prompt_token_ids": [1, 5 + i, 6, 7] * (40 if i == 0 else 1)} for i in range(5)]
    with torch.profiler.profile(record_shapes=True) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    found = set()
    for event in prof.events():  # every op outside pagedlm's: aten::, mkldnn::, ...
        if "::" not in event.name or event.name.startswith("pagedlm::") or event.name in _NO_COMPUTE:
            continue
        if soft_cap_in_fp32 and event.name in _FP32_SOFT_CAP:
            continue
        numel = sum(math.prod(shape) for shape in event.input_shapes if shape)
        if event.name not in _SMALL_ONLY or numel >= _GRAIN_SIZE:
            found.add((event.name, str(event.input_shapes)))
    assert not found
