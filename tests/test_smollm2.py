"""Parity with Hugging Face on the real embedded model (SmolLM2-135M-Instruct, downloaded once)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedlm import LLM, SamplingParams, default_model_path

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.", "Hi"]


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    return default_model_path()


def test_smollm2_greedy_matches_hf_and_answers(smollm2_dir):
    llm = LLM(smollm2_dir, dtype="float32")
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        ids = tokenizer(prompt).input_ids
        # SmolLM2's chat template starts with its BOS and the tokenizer adds none: exactly one BOS.
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref
    assert "Paris" in outs[0].outputs[0].text
    assert outs[0].outputs[0].finish_reason == "stop"


def test_smollm2_stop_token_text_is_left_out(smollm2_dir):
    """The reported cases: the text of the token that stopped a sequence is not in ``text``."""
    llm = LLM(smollm2_dir, dtype="float32")
    assert llm.get_tokenizer().decode([14797]) == " colours"
    for include, expected in ((False, " the primary"), (True, " the primary colours")):
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[14797],
                                include_stop_str_in_output=include)
        comp = llm.generate("The three primary colours are", params, use_tqdm=False)[0].outputs[0]
        assert comp.text == expected and comp.token_ids[-1] == 14797 and comp.stop_reason == 14797
    tokenizer = llm.get_tokenizer()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    comp = llm.generate(chat, SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    assert comp.text == "The capital of France is Paris." and comp.finish_reason == "stop"
    assert comp.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_job_on_a_loaded_embedded_model_serves_its_names(smollm2_dir, tmp_path):
    """Found by a user's audit: run_job(llm=LLM(default_model_path())) served the GGUF cache path as
    the model, so an OpenAI row naming "SmolLM2-135M-Instruct" (as the docs' example does) failed."""
    import json

    from pagedlm.entrypoints.jobs import JobConfig, run_job

    row = {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}],
                    "max_completion_tokens": 2}}
    (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
    with LLM(smollm2_dir) as llm:
        run_job(JobConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl")), llm=llm)
    out = json.loads((tmp_path / "out.jsonl").read_text())
    assert out["error"] is None and out["response"]["body"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
