"""``python -m pagedlm``: answer a batch of questions with the embedded default model
(SmolLM2-135M-Instruct), or with ``--model DIR_OR_GGUF``."""

import argparse

from pagedlm import LLM, SamplingParams, default_model_path

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write a haiku about the sea.",
    "Why is the sky blue? Answer in one sentence.",
    "Give me a synonym for 'happy'.",
    "What is the largest planet in the solar system?",
    "Translate 'good morning' into Spanish.",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedlm", description=__doc__ + " `pagedlm run --help`: the job runner.")
    parser.add_argument("--model", default=None, help="checkpoint directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:  # bad values as usage errors, the sampling ones before the model loads
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
        llm = LLM(args.model or default_model_path(), dtype=args.dtype)
    except ValueError as exc:
        parser.error(str(exc))
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    for question, out in zip(QUESTIONS, llm.chat(conversations, params)):
        print(f"\n>>> {question}\n{out.outputs[0].text.strip()}")
