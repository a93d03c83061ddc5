"""Time the sampler on one decode step's logits: ``[batch, vocab]`` rows under common sampling
settings (greedy, temperature, top-p, top-k + top-p). With ``--baseline FILE`` (a sampler.py from an
earlier commit, e.g. ``git show REV:pagedlm/model_executor/layers/sampler.py > old.py``) it times
that one on the same logits too, in the same run.

    python benchmarks/sampler_bench.py --batch 256
"""

import argparse
import importlib.util
import inspect
import time

import torch

from jobs import Load
from pagedlm import SamplingParams
from pagedlm.model_executor.layers import sampler as current

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "greedy, logprobs 0": dict(temperature=0.0, logprobs=0),
    "temperature 0.8": dict(temperature=0.8),
    "temperature 0.8, top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "temperature 0.7, top_k 50, top_p 0.9": dict(temperature=0.7, top_k=50, top_p=0.9),
}


def load(path: str):
    spec = importlib.util.spec_from_file_location("baseline_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_sampler(module, logits: torch.Tensor, params: SamplingParams, repeats: int) -> float:
    rows, vocab = logits.shape
    # Before the engine/worker seam (issue 12) the sampler took the EOS ids; now per-row banned ids.
    if "banned_token_ids" in inspect.signature(module.SamplingMetadata.build).parameters:
        meta = module.SamplingMetadata.build([params] * rows, [[1]] * rows, [[]] * rows, [()] * rows, {}, [], vocab, logits.device)
    else:
        meta = module.SamplingMetadata.build([params] * rows, [[1]] * rows, [[]] * rows, {}, [0], [], vocab, logits.device)
    sampler = module.Sampler()
    sampler(logits, meta)
    start = time.perf_counter()
    for _ in range(repeats):
        sampler(logits, meta)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary by default")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", help="an earlier sampler.py to time on the same logits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logits = (3 * torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0))).to(getattr(torch, args.dtype))
    systems = {"pagedlm": current} | ({"baseline": load(args.baseline)} if args.baseline else {})
    print(f"sampler on [{args.batch}, {args.vocab}] {args.dtype} logits, {args.threads} threads, ms per call")
    print(f"{'setting':<38}" + "".join(f"{name:>12}" for name in systems) + ("     ratio" if args.baseline else ""))
    with Load() as machine:
        for label, kwargs in SETTINGS.items():
            params = SamplingParams(**kwargs)
            ms = [1e3 * time_sampler(module, logits, params, args.repeats) for module in systems.values()]
            ratio = f"{ms[1] / ms[0]:9.1f}x" if args.baseline else ""
            print(f"{label:<38}" + "".join(f"{m:12.1f}" for m in ms) + ratio)
    print(f"other processes kept {machine.others:.2f} cores busy meanwhile")


if __name__ == "__main__":
    main()
