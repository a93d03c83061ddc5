"""The engine's own per-step cost (scheduling, step metadata, input tensors, the sampler over a real
vocabulary, outputs, detokenization, stop checks) at a large batch, with the model stubbed out.

The engine runs SmolLM2-135M's tokenizer and config (one layer of width 64, random weights, so it
loads fast); its forward pass is replaced by a stub that returns zeros and its LM head by fixed
random logits, so a step is only what the engine does around the model. Every sequence decodes
``--output-len`` tokens, three times over; the median step after the first few is reported with
how busy the rest of the machine was. Compare two trees by running the script with each on
``PYTHONPATH``, interleaved::

    for i in 1 2 3; do for tree in /path/old /path/new; do
        PYTHONPATH=$tree python benchmarks/engine_overhead.py; done; done
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pagedlm import LLM, SamplingParams, default_model_path


def tiny_model(path: str) -> None:
    source = default_model_path()
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(os.path.join(source, name), path)


class StubModel:
    """Zeros for hidden states and fixed random logits: a model step that costs (almost) nothing."""

    def __init__(self, vocab_size: int) -> None:
        self.logits = torch.randn(4096, vocab_size)
        self.tokens = self.logits.argmax(dim=-1)

    def __call__(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        return torch.zeros(len(input_ids), 8)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(hidden)]

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tokens[: len(hidden)]  # as the LM head's argmax epilogue gives them, without logits


def busy_cpu_seconds() -> float:
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as path:
        tiny_model(path)
        llm = LLM(path, dtype="float32", max_num_seqs=args.num_seqs)
        runner = llm.llm_engine.model_runner
        runner.model = StubModel(runner.vocab_size)
        prompts = [{"prompt_token_ids": [(7 * i + j) % 5000 + 100 for j in range(32)]} for i in range(args.num_seqs)]
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        times: list[float] = []
        step = llm.llm_engine.step

        def timed_step():
            start = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - start)
            return out

        llm.llm_engine.step = timed_step
        busy, own, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        for _ in range(3):
            llm.generate(prompts, params, use_tqdm=False)
        others = (busy_cpu_seconds() - busy - time.process_time() + own) / (time.perf_counter() - start)
    steps = times[8:]
    print(f"{args.num_seqs} sequences, engine only: median step {1e3 * statistics.median(steps):.2f} ms "
          f"(min {1e3 * min(steps):.2f}); other processes kept {others:.2f} cores busy")


if __name__ == "__main__":
    main()
