"""Decode throughput against batch size: the curve behind ``max_num_seqs``.

For each batch size B, B evenly spaced alpaca requests (synthetic prompts without the shared data
set, see ``profile_decode.py``) decode together; after ``--skip`` steps every step decodes one
token for each of the B sequences, and the mean time of the next ``--steps`` steps gives the step
latency and B / latency tokens/s.

    python benchmarks/batch_sweep.py --plot decode_batch.png
    python benchmarks/batch_sweep.py --dtype float32 --batch-sizes 16,64,256
"""

import argparse

import torch

from pagedlm import LLM, SamplingParams, default_model_path
from profile_decode import after_each_step, prompts_for


def step_ms(model: str, dtype: str, batch: int, args: argparse.Namespace) -> float:
    llm = LLM(model, dtype=dtype, max_num_seqs=batch)
    prompts = prompts_for(llm, argparse.Namespace(num_seqs=batch, synthetic=args.synthetic, prompt_len=64))
    times: list[float] = []
    after_each_step(llm, times.append)
    params = SamplingParams(temperature=0, max_tokens=args.skip + args.steps, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    window = times[args.skip : args.skip + args.steps]
    return 1e3 * sum(window) / len(window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-sizes", default="1,16,64,128,256,512")
    parser.add_argument("--skip", type=int, default=16, help="steps before the timed window (prefill)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--plot", help="write tok/s and step latency against batch size to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or default_model_path()
    batches = [int(b) for b in args.batch_sizes.split(",")]

    print(f"decode steps, {args.dtype}, {args.threads} threads, mean of {args.steps} steps after {args.skip}")
    print(f"{'batch':>6} {'ms/step':>9} {'tok/s':>8}")
    latencies = []
    for batch in batches:
        latencies.append(step_ms(model, args.dtype, batch, args))
        print(f"{batch:>6} {latencies[-1]:9.1f} {batch / latencies[-1] * 1e3:8.0f}", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(batches, [b / ms * 1e3 for b, ms in zip(batches, latencies)], "o-", color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences decoding together")
        ax.set_ylabel("decode tokens/s", color="tab:blue")
        twin = ax.twinx()
        twin.plot(batches, latencies, "s--", color="tab:orange")
        twin.set_ylabel("ms per step", color="tab:orange")
        ax.set_title(f"pagedlm decode, {args.dtype}, {args.threads} threads", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
