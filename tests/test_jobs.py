"""``pagedlm run``: formats, per-row errors, resume after a kill, Parquet, progress and summary."""

import dataclasses
import datetime
import decimal
import gzip
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import BOS, CHAT_TEMPLATE as TEMPLATE
from pagedlm import LLM, SamplingParams
from pagedlm.entrypoints.jobs import storage
from pagedlm.entrypoints.jobs.files import resolve_input
from pagedlm.entrypoints.jobs.runner import JobConfig, read_input, run_job
from pagedlm.transformers_utils.tokenizer import TokenBytes

ENGINE = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8}


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def read_output(path) -> list[dict]:
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(model, inp, out, tty=False, sampling=None, **kw):
    """The job, whose rows may carry their own chat template (the tiny model has none)."""
    sampling = {"temperature": 0.0, "max_tokens": 6} if sampling is None else sampling
    kw.setdefault("trust_request_chat_template", True)
    config = JobConfig(input=str(inp), output=str(out), model=model, engine=dict(ENGINE), sampling=sampling, **kw)
    stats, interrupted = run_job(config, tty=tty)
    assert interrupted is None
    return stats, read_output(out)


def by_id(rows, key="id") -> dict:
    return {r[key]: r for r in rows}


@pytest.fixture(scope="module")
def reference(llama_dir):
    """Greedy completions from LLM.generate, the runner's reference."""
    with LLM(llama_dir, **ENGINE) as llm:
        def complete(prompts, **params):
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, **params), use_tqdm=False)
            return [o.outputs for o in outs]
        yield complete


def test_plain_rows_good_and_bad(llama_dir, reference, tmp_path):
    good = [{"id": i, "prompt": f"Hello {i}", "extra": [i, {"k": "v"}]} for i in range(5)]
    rows = [
        good[0],
        {"id": 10, "prompt_token_ids": [BOS, 5, 6, 7]},
        "{not json",
        {"id": 11},  # no prompt column
        {"id": 12, "prompt": "x", "messages": [{"role": "user", "content": "y"}]},  # two prompt columns
        {"prompt": "no id"},
        {"id": 1.5, "prompt": "float id"},
        good[1],
        {"id": 0, "prompt": "duplicate of id 0"},
        {"id": 13, "prompt": "x", "sampling_params": {"temperature": -1}},
        {"id": 14, "prompt": "x", "sampling_params": {"tempreature": 1}},
        {"id": 15, "prompt": "x", "sampling_params": "hot"},
        {"id": 16, "prompt_token_ids": []},  # empty prompt: refused by the engine's check
        {"id": 17, "prompt": "word " * 200},  # longer than max_model_len
        {"id": 18, "prompt_token_ids": [BOS, 10**6]},  # outside the vocabulary
        {"id": 19, "messages": [{"role": 7, "content": "hi"}]},
        {"id": 20, "prompt": "x", "outputs": "clash"},
        *good[2:],
        {"id": 21, "prompt": "hot", "sampling_params": {"temperature": 1.0, "seed": 7, "max_tokens": 3}},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl")
    errors = [r for r in out if r["error"]]
    ok = by_id([r for r in out if not r["error"]])
    assert sorted(ok) == [0, 1, 2, 3, 4, 10, 21]
    assert len(errors) == 14 and len(out) == len(rows) == stats.rows == 21
    assert (stats.completed, stats.errors, stats.skipped) == (7, 14, 0)
    messages = " | ".join(r["error"] for r in errors)
    for needle in ("line 3 is not valid JSON: Expecting property name enclosed in double quotes at character 2 of the line",
                   "exactly one of prompt, messages, prompt_token_ids",
                   "id must be a string or an integer, got 1.5", "id must be a string or an integer, got null",
                   "duplicate id 0", "temperature must be in [0, 2]",
                   "unknown field(s) tempreature", "sampling_params must be an object", "the prompt is empty",
                   "max_model_len", "outside the vocabulary", "'role' must be a str", "are the output's"):
        assert needle in messages, needle
    expected = reference([f"Hello {i}" for i in range(5)] + [{"prompt_token_ids": [BOS, 5, 6, 7]}])
    for key, completions in zip([0, 1, 2, 3, 4, 10], expected):
        row = ok[key]
        assert row["outputs"][0]["token_ids"] == completions[0].token_ids
        assert row["outputs"][0]["text"] == completions[0].text
        assert row["completion_tokens"] == 6 and row["prompt_tokens"] > 0
    assert ok[3]["extra"] == [3, {"k": "v"}] and ok[3]["prompt"] == "Hello 3"  # carried through
    assert len(ok[21]["outputs"][0]["token_ids"]) == 3  # the row's own sampling params win
    assert stats.prompt_tokens == sum(r["prompt_tokens"] for r in ok.values())
    assert stats.completion_tokens == sum(r["completion_tokens"] for r in ok.values())
    summary = json.load(open(str(tmp_path / "out.jsonl") + ".summary.json"))
    assert (summary["rows"], summary["completed"], summary["errors"], summary["interrupted"]) == (21, 7, 14, False)


def test_a_row_may_set_repetition_detection_but_not_what_only_code_can_give(llama_dir, tmp_path):
    detection = {"max_pattern_size": 1, "min_count": 2}
    rows = [{"id": 0, "prompt_token_ids": [BOS, 5], "sampling_params": {"repetition_detection": detection,
                                                                         "allowed_token_ids": [9], "max_tokens": 8}},
            {"id": 1, "prompt": "x", "sampling_params": {"extra_args": {"k": 1}}},
            {"id": 2, "prompt": "x", "sampling_params": {"skip_clone": True}},
            {"id": 3, "prompt": "x", "sampling_params": {"repetition_detection": {"max_pattern_size": 1}}},
            {"id": 4, "prompt": "x", "sampling_params": {"logits_processors": []}}]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    rows = by_id(out)
    completion = rows[0]["outputs"][0]
    assert (completion["token_ids"], completion["finish_reason"], completion["stop_reason"]) == \
        ([9, 9], "repetition", "repetition_detected")
    assert "field(s) a job row cannot set extra_args" in rows[1]["error"]
    assert "field(s) a job row cannot set skip_clone" in rows[2]["error"]
    assert "repetition_detection.min_count must be >= 2" in rows[3]["error"]
    assert "field(s) a job row cannot set logits_processors" in rows[4]["error"]


def _openai_row(custom_id, url, body):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_openai_batch_format(llama_dir, reference, tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rows = [
        _openai_row("chat", "/v1/chat/completions",
                    {"model": "tiny", "messages": chat, "chat_template": TEMPLATE, "max_completion_tokens": 5,
                     "logprobs": True, "top_logprobs": 2}),
        _openai_row("cmpl", "/v1/completions", {"model": "tiny", "prompt": "Hello 1", "max_tokens": 6, "logprobs": 3, "temperature": 0}),
        _openai_row("n3", "/v1/completions", {"prompt": "Hello", "n": 3, "temperature": 1.0, "seed": 1, "max_tokens": 4}),
        _openai_row("best-of", "/v1/completions", {"prompt": "Hello", "n": 2, "best_of": 5, "temperature": 1.0, "seed": 3,
                                                    "max_tokens": 4}),
        _openai_row("hot", "/v1/completions", {"prompt": "Hello", "temperature": 2.0, "seed": 5, "max_tokens": 8,
                                                "logprobs": 1}),
        _openai_row("default-len", "/v1/completions", {"prompt": "Hello", "ignore_eos": True, "temperature": 0}),
        _openai_row("no-template", "/v1/chat/completions", {"messages": chat}),
        _openai_row("embed", "/v1/embeddings", {"input": "x"}),
        _openai_row("other-model", "/v1/completions", {"model": "gpt-4o", "prompt": "x"}),
        _openai_row("tools", "/v1/chat/completions", {"messages": chat, "chat_template": TEMPLATE, "tools": []}),
        _openai_row("stream", "/v1/completions", {"prompt": "x", "stream": True}),
        {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}},
    ]
    inp = write_jsonl(tmp_path / "batch.jsonl", rows)
    config = JobConfig(input=inp, output=str(tmp_path / "out.jsonl"), model=llama_dir, engine=dict(ENGINE),
                       served_model_names=["tiny"], trust_request_chat_template=True)
    stats, _ = run_job(config, tty=False)
    out = by_id(read_output(tmp_path / "out.jsonl"), "custom_id")
    assert sorted(out) == sorted(r["custom_id"] for r in rows) and stats.errors == 6
    for row in out.values():
        assert set(row) == {"id", "custom_id", "response", "error"} and row["id"].startswith("batch_req_")
        assert set(row["response"]) == {"status_code", "request_id", "body"}
    for bad, param in [("no-template", "messages"), ("embed", "url"), ("other-model", "model"),
                       ("tools", "tools"), ("stream", "stream"), ("get", "method")]:
        row = out[bad]
        # A model the job does not serve: 404, as vLLM's server (NotFoundError) and OpenAI answer it.
        assert row["response"]["status_code"] == (404 if bad == "other-model" else 400) and row["error"]["message"]
        assert row["response"]["body"]["error"]["type"] == "invalid_request_error"
        assert row["response"]["body"]["error"]["param"] == param, bad
    # The job was started with --served-model-name: the error does not suggest it. Row values are
    # quoted as the row's JSON.
    assert 'body.model "gpt-4o" is not the model this job serves; use one of "tiny"' in out["other-model"]["error"]["message"]
    assert 'method must be "POST", got "GET"' in out["get"]["error"]["message"]
    assert "--served-model-name" not in out["other-model"]["error"]["message"]

    body = out["chat"]["response"]["body"]
    assert out["chat"]["response"]["status_code"] == 200 and out["chat"]["error"] is None
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert isinstance(entry["token"], str) and isinstance(entry["logprob"], float)
        assert isinstance(entry["bytes"], list) and all(0 <= b < 256 for b in entry["bytes"])
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["logprob"] >= entry["logprob"]
    hf_ids = AutoTokenizer.from_pretrained(llama_dir).apply_chat_template(
        chat, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(hf_ids)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]

    body = out["cmpl"]["response"]["body"]
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == reference(["Hello 1"])[0][0].text
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][0] == 0
    assert all(len(top) <= 3 for top in lp["top_logprobs"])
    choices = out["n3"]["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and all(c["text"] is not None for c in choices)
    # The n best of best_of are numbered 0..n-1, as OpenAI numbers choices.
    assert [c["index"] for c in out["best-of"]["response"]["body"]["choices"]] == [0, 1]
    # Completions' top_logprobs hold the sampled token too, when it is not among the k best (OpenAI's
    # "up to logprobs + 1").
    lp = out["hot"]["response"]["body"]["choices"][0]["logprobs"]
    assert all(token in top and len(top) <= 2 for token, top in zip(lp["tokens"], lp["top_logprobs"]))
    assert any(len(top) == 2 for top in lp["top_logprobs"])
    # /v1/completions without max_tokens: OpenAI's default of 16 tokens.
    assert out["default-len"]["response"]["body"]["usage"]["completion_tokens"] == 16


def test_output_is_never_overwritten_and_resume_checks_settings(llama_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Hello {i}"} for i in range(3)])
    out = tmp_path / "out.jsonl"
    run(llama_dir, inp, out)
    with pytest.raises(ValueError, match="exists; pass --resume"):
        run(llama_dir, inp, out)
    config = JobConfig(input=inp, output=str(out), model=llama_dir, engine=dict(ENGINE), resume=True,
                       sampling={"temperature": 0.5, "max_tokens": 6}, trust_request_chat_template=True)
    with pytest.raises(ValueError, match="sampling: started with"):
        run_job(config)
    stats, rows = run(llama_dir, inp, out, resume=True)  # same settings: nothing left to do
    assert (stats.skipped, stats.completed, len(rows)) == (3, 0, 3)


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pagedlm", "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_rows(proc: subprocess.Popen, path, num_lines: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if os.path.exists(path) and open(path, "rb").read().count(b"\n") >= num_lines:
            return
        time.sleep(0.05)
    raise AssertionError("the job wrote no rows in time")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_job_resumes_to_the_uninterrupted_result(llama_dir, tmp_path, how):
    rows = [{"id": f"r{i}", "prompt": f"Row number {i} says"} for i in range(160)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    _, expected = run(llama_dir, inp, tmp_path / "whole.jsonl")
    out = tmp_path / "out.jsonl"
    args = ["--model", llama_dir, "--input", inp, "--output", str(out), "--temperature", "0", "--max-tokens", "6",
            "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8", "--max-in-flight", "8"]
    proc = _start(args)
    _wait_for_rows(proc, out, 20)
    proc.send_signal(getattr(signal, how))
    log = proc.communicate(timeout=60)[0]
    written = open(out, "rb").read()
    if how == "SIGTERM":
        assert proc.returncode == 128 + signal.SIGTERM, log
        assert "--resume continues the job" in log and written.endswith(b"\n")
        assert json.load(open(str(out) + ".summary.json"))["interrupted"] is True
    else:
        assert proc.returncode == -signal.SIGKILL
        with open(out, "ab") as f:  # as if the kill had torn the line being written
            f.write(b'{"id": "r999", "outputs": [{"te')
    assert written.count(b"\n") < len(rows), "the job finished before it was stopped"
    proc = _start(args + ["--resume"])
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    result = read_output(out)
    assert sorted(r["id"] for r in result) == sorted(r["id"] for r in rows)  # each id exactly once
    assert by_id(result) == by_id(expected)


def test_signals_during_the_shutdown_lose_no_finished_row(llama_dir, tmp_path):
    """Ctrl-C pressed again (and again) while an interrupted job writes what has finished: the
    rows, their Parquet parts and the summary are still written; the exit status is the first
    signal's, or SIGINT's where one lands once the job has reported."""
    rows = [{"id": f"r{i}", "prompt": f"Row number {i} says"} for i in range(160)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    args = ["--model", llama_dir, "--input", inp, "--output", str(out), "--temperature", "0", "--max-tokens", "6",
            "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8", "--max-in-flight", "8",
            "--progress-interval", "0"]
    proc = _start(args)
    lines = []
    for line in proc.stdout:  # a progress line per finished row
        lines.append(line)
        if line.startswith("[pagedlm run] rows 30/"):
            break
    proc.send_signal(signal.SIGTERM)
    while proc.poll() is None:
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
    log = "".join(lines) + proc.stdout.read()
    assert proc.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT), log
    assert "Traceback" not in log and "still writing what has finished" in log, log
    summary = json.load(open(str(out) + ".summary.json"))
    assert summary["interrupted"] is True and summary["completed"] > 0, summary
    proc = _start(args + ["--resume"])
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    assert json.load(open(str(out) + ".summary.json"))["skipped"] == summary["completed"]
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(r["id"] for r in rows)


def test_parquet_round_trips_keep_every_column(chat_llama_dir, tmp_path):
    when = datetime.datetime(2026, 11, 30, 12, 0, 0)
    table = pa.table({
        "id": pa.array([1, 2, 3], pa.int64()),
        "prompt": ["Hello 1", None, "Hello 3"],
        "messages": pa.array([None, [{"role": "user", "content": "Hi", "name": None}], None]),
        "score": pa.array([0.5, 1.5, None], pa.float32()),
        "tags": [["a"], [], ["b", "c"]],
        "meta": [{"source": "x", "n": 1}, {"source": "y", "n": 2}, {"source": "z", "n": 3}],
        "when": pa.array([when] * 3, pa.timestamp("us")),
        "sampling_params": pa.array([{"max_tokens": 2, "seed": None}, None, {"max_tokens": None, "seed": 4}]),
    })
    inp = str(tmp_path / "in.parquet")
    pq.write_table(table, inp)
    _, out = run(chat_llama_dir, inp, tmp_path / "out.parquet")
    assert not os.path.exists(str(tmp_path / "out.parquet") + ".parts")
    schema = pq.read_schema(tmp_path / "out.parquet")
    for name in table.column_names:  # Parquet -> Parquet: every input column, with its type
        assert schema.field(name).type == table.schema.field(name).type, name
    got, rows = by_id(out), by_id(table.to_pylist())
    for key, row in rows.items():
        assert {k: got[key][k] for k in row} == row
        assert got[key]["error"] is None, got[key]["error"]
    assert len(got[1]["outputs"][0]["token_ids"]) == 2 and len(got[3]["outputs"][0]["token_ids"]) == 6
    assert got[2]["prompt_tokens"] == len(AutoTokenizer.from_pretrained(chat_llama_dir).apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    # Parquet -> JSONL: the same values as JSON (the timestamp in ISO 8601).
    _, as_json = run(chat_llama_dir, inp, tmp_path / "out.jsonl")
    for key, row in by_id(as_json).items():
        assert row == {**got[key], "when": when.isoformat()}

    # JSONL -> Parquet: every column, with the types JSON gives.
    jsonl_in = write_jsonl(tmp_path / "in2.jsonl", [{**r, "when": when.isoformat()} for r in rows.values()])
    _, from_json = run(chat_llama_dir, jsonl_in, tmp_path / "out2.parquet")
    for key, row in by_id(from_json).items():
        assert row == {**got[key], "when": when.isoformat(), "score": rows[key]["score"]}


def test_non_tty_progress_lines_and_summary(llama_dir, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Hello {i}"} for i in range(12)] + ["oops"])
    stats, _ = run(llama_dir, inp, tmp_path / "out.jsonl", progress_interval=0.0)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[pagedlm run] rows")]
    assert [line.split()[3] for line in lines] == [f"{i}/13" for i in range(1, 14)]  # interval 0: a line a row
    assert "rows 13/13 (100.0%), errors 1," in lines[-1] and "generated tok/s" in lines[-1]
    assert (stats.rows, stats.completed, stats.errors) == (13, 12, 1)


def test_a_written_row_reaches_the_disk_without_waiting_for_the_next(tmp_path):
    from pagedlm.entrypoints.jobs.files import JsonlWriter

    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(str(path), False, lambda row: [row["id"]], sync_interval=0.05)
    writer.write({"id": 1})
    deadline = time.monotonic() + 30
    while path.stat().st_size == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.read_text() == '{"id": 1}\n'  # synced by the writer's thread, the file still open
    writer.close()
    with open(path, "a") as f:
        f.write('{"id": 2, "tor')
    resumed = JsonlWriter(str(path), True, lambda row: [row["id"]])
    assert resumed.keys == {1: 1} and path.read_text() == '{"id": 1}\n'
    resumed.close()


def test_parquet_nulls_of_other_rows_keys_are_unset_in_every_object_field(llama_dir, tmp_path):
    """Found by a review: a Parquet struct gives each row the other rows' keys as nulls. Row 1's
    chat_template_kwargs got row 2's key as a null and was refused for a key it never set, and
    an OpenAI body's repetition_detection got a null min_pattern_size."""
    template = "{{ bos_token }}{% if a %}A{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = [{"role": "user", "content": "hi"}]
    plain = pa.table({"id": [1, 2], "messages": [chat, chat], "chat_template": [template, template],
                      "chat_template_kwargs": [{"a": True}, {"zzz": True}]})
    pq.write_table(plain, tmp_path / "plain.parquet")
    _, out = run(llama_dir, tmp_path / "plain.parquet", tmp_path / "plain.jsonl")
    rows = by_id(out)
    tokens = AutoTokenizer.from_pretrained(llama_dir)("<s>Ahi", add_special_tokens=False)["input_ids"]
    assert rows[1]["error"] is None and rows[1]["prompt_tokens"] == len(tokens)
    assert "the chat template does not read zzz" in rows[2]["error"]
    bodies = [{"prompt": "x", "max_tokens": 6, "repetition_detection": {"max_pattern_size": 1, "min_count": 2}},
              {"prompt": "y", "max_tokens": 6,
               "repetition_detection": {"max_pattern_size": 2, "min_count": 2, "min_pattern_size": 2}}]
    batch = pa.table({"custom_id": ["a", "b"], "method": ["POST"] * 2, "url": ["/v1/completions"] * 2, "body": bodies})
    pq.write_table(batch, tmp_path / "batch.parquet")
    _, out = run(llama_dir, tmp_path / "batch.parquet", tmp_path / "batch.jsonl")
    assert [row["error"] for row in out] == [None, None]


def test_parquet_output_of_mixed_json_columns_resumes_without_repeats(llama_dir, tmp_path):
    rows = [{"id": 1, "prompt": "a", "x": 1}, {"id": "b", "prompt": "b", "x": "text"},
            {"id": 2.5, "prompt": "bad id", "x": None}, {"id": 3, "prompt": "c", "x": {"k": [1]}}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    stats, first = run(llama_dir, inp, out)
    assert (stats.completed, stats.errors) == (3, 1)
    assert pq.read_schema(out).field("x").type == pa.string()  # no common type: JSON text
    assert sorted(r["x"] for r in first if r["x"] is not None) == ["1", "text", '{"k": [1]}']
    assert [r["id"] for r in first if r["error"]] == [None] and "got 2.5" in [r["error"] for r in first if r["error"]][0]
    stats, again = run(llama_dir, inp, out, resume=True)
    assert (stats.skipped, stats.completed, stats.errors) == (4, 0, 0) and again == first


def test_parquet_output_puts_the_results_after_the_input_s_columns(llama_dir, tmp_path):
    """Found by a review: a first row that is not JSON has no input columns, and its error row set
    the merged file's column order (id, the results, then prompt and meta)."""
    inp = write_jsonl(tmp_path / "in.jsonl", ["not json", {"id": 1, "prompt": "a", "meta": 2}])
    stats, _ = run(llama_dir, inp, tmp_path / "out.parquet", sampling={"max_tokens": 1})
    assert (stats.completed, stats.errors) == (1, 1)
    assert pq.read_schema(tmp_path / "out.parquet").names == [
        "id", "prompt", "meta", "outputs", "prompt_tokens", "completion_tokens", "error"]


def test_resume_reads_a_jsonl_output_with_blank_lines(tmp_path):
    """A blank line (an editor's, or a cat of two outputs) was 'not valid JSON' and refused the resume."""
    from pagedlm.entrypoints.jobs.files import JsonlWriter

    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1}\n\n{"id": 2}\r\n  \r\n{"id": 3}\n\n{"id": 4, "te')
    writer = JsonlWriter(str(path), True, lambda row: [row["id"]])
    writer.close()
    assert writer.keys == {1: 1, 2: 1, 3: 1}
    assert path.read_bytes() == b'{"id": 1}\n\n{"id": 2}\r\n  \r\n{"id": 3}\n\n'  # the torn row only is cut


def test_parquet_parts_of_an_interrupted_job_are_resumed(tmp_path):
    from pagedlm.entrypoints.jobs.files import ParquetWriter
    from pagedlm.entrypoints.jobs.plain_rows import output_schema

    path, schema = str(tmp_path / "out.parquet"), output_schema()
    writer = ParquetWriter(path, False, lambda row: [row["id"]], "id", schema, part_rows=2)
    for i in range(5):
        writer.write({"id": i, "error": None})
    writer.close(finished=False)  # as after SIGTERM: the parts stay, no output file yet
    assert not os.path.exists(path) and len(os.listdir(path + ".parts")) == 3
    writer = ParquetWriter(path, True, lambda row: [row["id"]], "id", schema)
    assert writer.keys == {str(i): 1 for i in range(5)}
    writer.write({"id": 5, "error": "late"})
    writer.close()
    assert [r["id"] for r in pq.read_table(path).to_pylist()] == list(range(6))
    assert not os.path.exists(path + ".parts")
    assert pq.ParquetFile(path).num_row_groups == 1  # the four parts' rows in one group (a soak hunt: one each)
    # A resume that writes nothing (its model failed to load: found by a review, the output had
    # become a part) leaves the finished output where it was; one that writes takes it in.
    writer = ParquetWriter(path, True, lambda row: [row["id"]], "id", schema)
    assert writer.keys == {str(i): 1 for i in range(6)}
    writer.close(finished=False)
    assert os.path.exists(path) and not os.path.exists(path + ".parts")
    writer = ParquetWriter(path, True, lambda row: [row["id"]], "id", schema)
    writer.write({"id": 6, "error": None})
    writer.close(finished=False)
    assert not os.path.exists(path) and len(os.listdir(path + ".parts")) == 2
    writer = ParquetWriter(path, True, lambda row: [row["id"]], "id", schema)
    writer.close()
    assert [r["id"] for r in pq.read_table(path).to_pylist()] == list(range(7))


def test_parquet_parts_whose_values_do_not_convert_exactly_merge_as_text(tmp_path):
    """Found by a hunt: an int beyond 2**53 in one part and a float in another made the merge's
    float64 cast fail; its text fallback was forced back to the float64 column (the int rounded)
    or, in a struct or list, failed the merge and every resume. Such a column is text now, as the
    same rows in one part are written; exact promotions stay."""
    from pagedlm.entrypoints.jobs.files import ParquetWriter
    from pagedlm.entrypoints.jobs.plain_rows import output_schema

    big = 2**53 + 1
    rows = [{"id": 1, "flat": big, "nested": {"v": big}, "listed": [big], "exact": 1, "same": "a"},
            {"id": 2, "flat": 0.5, "nested": {"v": 0.5}, "listed": [0.5], "exact": 0.5, "same": "b"}]
    merged = {}
    for part_rows in (1, 2):  # a part a row, and both in one part
        path = str(tmp_path / f"out{part_rows}.parquet")
        writer = ParquetWriter(path, False, lambda row: [row["id"]], "id", output_schema(), part_rows=part_rows)
        for row in rows:
            writer.write(row)
        writer.close()
        merged[part_rows] = pq.read_table(path)
    table = merged[1]
    assert table.column("flat").to_pylist() == [str(big), "0.5"]
    assert table.column("nested").to_pylist() == [json.dumps({"v": big}), json.dumps({"v": 0.5})]
    assert table.column("listed").to_pylist() == [f"[{big}]", "[0.5]"]
    assert table.column("exact").to_pylist() == [1.0, 0.5] and table.column("same").to_pylist() == ["a", "b"]
    assert merged[2].select(["flat", "nested", "listed", "exact"]).to_pylist() == \
        table.select(["flat", "nested", "listed", "exact"]).to_pylist()


def test_a_kill_between_the_parquet_merge_and_the_parts_removal_resumes_without_repeats(tmp_path):
    """Found by a hunt: both the merged output and its parts were there, and --resume made the
    output a part beside them (450 rows for 400)."""
    from pagedlm.entrypoints.jobs.files import ParquetWriter
    from pagedlm.entrypoints.jobs.plain_rows import output_schema

    path, schema = str(tmp_path / "out.parquet"), output_schema()
    writer = ParquetWriter(path, False, lambda row: [row["id"]], "id", schema, part_rows=2)
    for i in range(5):
        writer.write({"id": i, "error": None})
    writer.close()
    os.makedirs(path + ".parts")  # as if killed after the rename: a part the merge already holds
    pq.write_table(pq.read_table(path).slice(0, 2), path + ".parts/part-000002.parquet")
    writer = ParquetWriter(path, True, lambda row: [row["id"]], "id", schema)
    assert writer.keys == {str(i): 1 for i in range(5)}
    writer.close()
    assert [r["id"] for r in pq.read_table(path).to_pylist()] == list(range(5))


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_a_full_disk_stops_the_job_with_one_clear_error_and_resume_finishes_it(llama_dir, tmp_path, monkeypatch, capsys,
                                                                                out_name):
    """Found by a hunt: the writer's thread died on ENOSPC, each later write tried to start it again
    (RuntimeError: threads can only be started once), and no clear message came."""
    import errno

    from pagedlm.entrypoints.cli import run_main
    from pagedlm.entrypoints.jobs import files

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"row {i}"} for i in range(6)])
    out = tmp_path / out_name
    args = ["--input", inp, "--output", str(out), "--model", llama_dir, "--max-tokens", "2", "--dtype", "float32",
            "--max-in-flight", "2"]
    writer_class = files.JsonlWriter if out_name.endswith(".jsonl") else files.ParquetWriter
    real_append, calls = writer_class._append, {"n": 0}

    def append(self, row):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, row)

    monkeypatch.setattr(writer_class, "_append", append)
    assert run_main(args) == 1
    err = capsys.readouterr().err
    assert f"pagedlm run: error: cannot write {out}: No space left on device; the rows synced before are kept" in err
    assert "Traceback" not in err and "threads can only be started once" not in err
    monkeypatch.undo()
    assert run_main(args + ["--resume"]) == 0
    rows = pq.read_table(out).to_pylist() if out_name.endswith(".parquet") else \
        [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(6)) and all(r["error"] is None for r in rows)


def test_a_full_disk_while_merging_parquet_parts_leaves_no_partial_file(llama_dir, tmp_path, monkeypatch, capsys):
    """The merged output is written as OUT.parquet.tmp, then renamed; a full disk left the
    half-written OUT.parquet.tmp behind (pyarrow's write_table removes its own, as a part's)."""
    import errno

    from pagedlm.entrypoints.cli import run_main
    from pagedlm.entrypoints.jobs import files

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"row {i}"} for i in range(3)])
    out = tmp_path / "out.parquet"
    args = ["--input", inp, "--output", str(out), "--model", llama_dir, "--max-tokens", "2", "--dtype", "float32"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_conform", full)  # the merge's first part, after OUT.parquet.tmp is opened
    assert run_main(args) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []
    assert (tmp_path / "out.parquet.parts").is_dir() and not out.exists()
    monkeypatch.undo()
    assert run_main(args + ["--resume"]) == 0
    assert sorted(r["id"] for r in pq.read_table(out).to_pylist()) == [0, 1, 2]


def test_a_summary_that_cannot_be_written_does_not_fail_a_finished_job(llama_dir, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    (tmp_path / "out.jsonl.summary.json").mkdir()  # opening it for writing fails (IsADirectoryError)
    stats, rows = run(llama_dir, inp, tmp_path / "out.jsonl", sampling={"max_tokens": 1})
    assert stats.completed == 1 and len(rows) == 1
    assert "could not write" in capsys.readouterr().err


@pytest.mark.parametrize("module, name, error, message", [
    # as a read-only remount between the checks and the model's load
    ("runner", "JsonlWriter", PermissionError(13, "Permission denied"), r"cannot open .*out.jsonl: Permission denied"),
    # found by a hunt: a full disk at the job's start gave a raw OSError traceback
    ("storage", "write_text", OSError(28, "No space left on device"),
     r"cannot write .*out.jsonl.job.json: No space left on device"),
])
def test_storage_that_refuses_the_jobs_start_is_an_output_write_error(llama_dir, tmp_path, monkeypatch, module, name,
                                                                      error, message):
    """One message, not a traceback."""
    import importlib

    from pagedlm.entrypoints.jobs import files

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(importlib.import_module(f"pagedlm.entrypoints.jobs.{module}"), name, refuse)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    with pytest.raises(files.OutputWriteError, match=message):
        run(llama_dir, inp, tmp_path / "out.jsonl")
    assert not os.path.exists(tmp_path / "out.jsonl")


def test_a_damaged_output_is_refused_before_the_model_loads(llama_dir, tmp_path, monkeypatch):
    """Found by a hunt: --resume into a damaged output loaded the model first, and a Parquet part
    of zero bytes was refused without its name."""
    from pagedlm.entrypoints.jobs import runner

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}, {"id": 2, "prompt": "y"}])
    run(llama_dir, inp, tmp_path / "out.jsonl")
    run(llama_dir, inp, tmp_path / "out.parquet")
    with open(tmp_path / "out.jsonl", "a") as f:
        f.write("garbage\n")
    os.makedirs(tmp_path / "out.parquet.parts")  # as an interrupted job leaves them, one part damaged
    os.replace(tmp_path / "out.parquet", tmp_path / "out.parquet.parts" / "part-000001.parquet")
    (tmp_path / "out.parquet.parts" / "part-000002.parquet").write_bytes(b"")

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(runner, "LLM", no_load)
    with pytest.raises(ValueError, match="out.jsonl: line 3 is not valid JSON"):
        run(llama_dir, inp, tmp_path / "out.jsonl", resume=True)
    # JSON that is no row (found by a hunt: a null line counted as a row without an id, done)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    (tmp_path / "out.jsonl").write_text("\n".join(lines[:2] + ["null"]) + "\n")
    with pytest.raises(ValueError, match=r"out.jsonl: line 3 is null, not a row \(a JSON object\)"):
        run(llama_dir, inp, tmp_path / "out.jsonl", resume=True)
    with pytest.raises(ValueError, match=r"part-000002.parquet cannot be read \(Parquet file size is 0 bytes\); "
                                         "cannot resume into it"):
        run(llama_dir, inp, tmp_path / "out.parquet", resume=True)


def test_a_job_resumes_with_its_input_and_model_by_another_path(llama_dir, tmp_path):
    """Found by a hunt: the job's record keeps absolute paths, so the same input or model by a
    symlinked path was refused as other settings (while the output check resolves symlinks)."""
    (tmp_path / "real").mkdir()
    inp = write_jsonl(tmp_path / "real" / "in.jsonl", [{"id": 1, "prompt": "a"}])
    run(llama_dir, inp, tmp_path / "out.jsonl")
    write_jsonl(tmp_path / "real" / "in.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}])
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(llama_dir, tmp_path / "model")
    stats, out = run(str(tmp_path / "model"), tmp_path / "link" / "in.jsonl", tmp_path / "out.jsonl", resume=True)
    assert (stats.skipped, stats.completed) == (1, 1) and sorted(r["id"] for r in out) == [1, 2]
    (tmp_path / "other").mkdir()
    other = write_jsonl(tmp_path / "other" / "in.jsonl", [{"id": 1, "prompt": "a"}])
    with pytest.raises(ValueError, match="input: started with"):
        run(llama_dir, other, tmp_path / "out.jsonl", resume=True)


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_rows_without_an_id_resume_by_their_position(llama_dir, tmp_path, out_name):
    """Found by a hunt: rows without an id were matched to the output's id-less error rows by count,
    so once a bad line was mended (its error row stays), a later row without an id counted as done
    and its error row was never written. Each is now matched by its position."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"\n')
    out = tmp_path / out_name
    stats, rows = run(llama_dir, inp, out)

    def label(rows):
        return sorted(r["error"][:26] if r["error"] else r["id"] for r in rows)

    assert label(rows) == ["a", "line 2 is not valid JSON: "]
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"prompt": "no id"}\n"neither"\n')
    stats, rows = run(llama_dir, inp, out, resume=True)
    assert (stats.skipped, stats.completed, stats.errors) == (1, 1, 2)
    assert label(rows) == ["a", "b", "line 2 is not valid JSON: ", "line 3: id must be a strin", "line 4: a row must be an o"]
    stats, again = run(llama_dir, inp, out, resume=True)
    assert (stats.skipped, stats.completed, stats.errors) == (4, 0, 0) and again == rows


def test_an_error_row_the_output_cannot_hold_keeps_its_row_s_position(llama_dir, tmp_path, monkeypatch):
    """A review: the row that replaces an output row the output cannot hold named no position, so a
    row without an id whose error row could not be written got another on every resume."""
    from pagedlm.entrypoints.jobs import files

    real = files.to_json

    def to_json(row):
        if "boom" in row:
            raise TypeError("no JSON form")
        return real(row)

    monkeypatch.setattr(files, "to_json", to_json)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, {"prompt": "b", "boom": 1},
                                              {"id": 3, "prompt": "c", "boom": 1}])
    stats, rows = run(llama_dir, inp, tmp_path / "out.jsonl")
    assert sorted(r["error"][:50] for r in rows if r["error"]) == [
        "line 2: id must be a string or an integer, got null (the output row could not be written: TypeError: "
        "no JSON form)"[:50], "the output row could not be written: TypeError: no"]
    # The summary's tokens are the completed row's alone (a review: the unwritable result's were counted).
    done = next(r for r in rows if r["id"] == 1)
    assert (stats.completed, stats.prompt_tokens, stats.completion_tokens) == (
        1, done["prompt_tokens"], done["completion_tokens"])
    stats, again = run(llama_dir, inp, tmp_path / "out.jsonl", resume=True)
    assert (stats.skipped, stats.errors) == (3, 0) and again == rows


def test_an_error_row_names_its_row_s_position_whatever_the_file_is_named():
    """A review: a file named with "line 3" in it gave every row of it one position."""
    from pagedlm.entrypoints.jobs.files import Position, named_positions

    for name in ("", "b.jsonl ", "a line 3 b.jsonl ", "x: line 3 y.jsonl "):
        for number in (2, 3, 30):
            where = f"{name}line {number}"
            read_error = f"{name[:-1]}: line {number} is not valid JSON" if name else f"line {number} is not valid JSON"
            for message in (read_error, f"{where}: id must be a string or an integer, got null"):
                assert Position(where) in named_positions(message), (where, message)
                others = [f"{name}line {n}" for n in (2, 3, 30) if n != number]
                assert not any(Position(other) in named_positions(message) for other in others), (where, message)
    assert named_positions("no position here") == []


def test_a_job_runs_to_its_end_after_its_stderr_reader_goes(llama_dir, tmp_path, monkeypatch):
    """Found by a hunt: with stderr a pipe whose reader had gone (``| head``, a log shipper
    restarting), a progress line's BrokenPipeError ended the job, or, printed as it closed, left it
    without its summary and exit status 0."""
    from pagedlm.entrypoints.cli import run_main

    read_end, write_end = os.pipe()
    os.close(read_end)
    stderr = open(write_end, "w")
    monkeypatch.setattr(sys, "stderr", stderr)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"row {i}"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    try:
        assert run_main(["--input", inp, "--output", str(out), "--model", llama_dir, "--max-tokens", "2",
                         "--dtype", "float32", "--progress-interval", "0"]) == 0
        print("and after it", file=sys.stderr, flush=True)  # stderr now writes nowhere, without an error
    finally:
        stderr.close()
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == [0, 1, 2, 3]
    assert json.load(open(f"{out}.summary.json"))["completed"] == 4


def test_a_part_whose_pages_are_damaged_is_refused_and_one_moved_aside_runs_again(llama_dir, tmp_path, monkeypatch):
    """Found by a hunt: a part whose footer and ids read but whose outputs do not was found only by
    the merge, after every remaining row had run (and by every later --resume again); and with a
    part moved aside, as the refusal says, the next part took the number of a kept one and replaced
    it, whose rows were counted done: lost."""
    import pyarrow.parquet as pq

    from pagedlm.entrypoints.jobs import runner

    rows = [{"id": i, "prompt": f"row {i}"} for i in range(6)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    _, reference = run(llama_dir, inp, tmp_path / "out.parquet")
    whole = pq.read_table(tmp_path / "out.parquet")
    os.remove(tmp_path / "out.parquet")
    parts = tmp_path / "out.parquet.parts"  # as an interrupted job leaves them: rows 0-1, 2-3, 4-5
    os.makedirs(parts)
    for number in (1, 2, 3):
        pq.write_table(whole.slice(2 * number - 2, 2), parts / f"part-{number:06d}.parquet")
    damaged = bytearray((parts / "part-000001.parquet").read_bytes())
    group = pq.ParquetFile(parts / "part-000001.parquet").metadata.row_group(0)
    column = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "prompt")
    for k in range(column.data_page_offset, column.data_page_offset + 16):
        damaged[k] ^= 0x5A
    (parts / "part-000001.parquet").write_bytes(damaged)
    assert pq.read_table(parts / "part-000001.parquet", columns=["id"]).num_rows == 2

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "LLM", no_load)
        with pytest.raises(ValueError, match="part-000001.parquet cannot be read .*move it aside"):
            run(llama_dir, inp, tmp_path / "out.parquet", resume=True)
    os.replace(parts / "part-000001.parquet", tmp_path / "aside.parquet")
    (parts / "notes.txt").write_text("not a part")
    stats, out = run(llama_dir, inp, tmp_path / "out.parquet", resume=True)
    assert stats.completed == 2 and stats.skipped == 4
    assert sorted(r["id"] for r in out) == list(range(6))
    assert by_id(out) == by_id(reference)


def test_a_part_that_cannot_be_written_stops_the_writer_once(tmp_path, monkeypatch):
    """Found by a review: a sync failing with anything but OSError (pyarrow's ValueError) killed
    the writer's thread, and every later write tried to start it again."""
    from pagedlm.entrypoints.jobs import files
    from pagedlm.entrypoints.jobs.plain_rows import output_schema

    def fail(*args, **kwargs):
        raise ValueError("cannot convert")

    writer = files.ParquetWriter(str(tmp_path / "out.parquet"), False, lambda row: [row["id"]], "id",
                                 output_schema(), part_rows=2)
    monkeypatch.setattr(files, "rows_to_table", fail)
    writer.write({"id": 1, "error": None})
    for _ in range(2):
        with pytest.raises(files.OutputWriteError, match="cannot write .*out.parquet: ValueError: cannot convert"):
            writer.write({"id": 2, "error": None})
    with pytest.raises(files.OutputWriteError):
        writer.close()


def test_values_json_has_no_literal_for_are_written_as_json_reads_them(llama_dir, tmp_path):
    """Found by a hunt: a Parquet uuid column failed every finished row's write (and the row was
    counted completed and an error: "unfinished": -2); NaN from pandas was written as a bare NaN,
    which strict JSON parsers refuse."""
    import uuid

    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"], "u": pa.array([uuid.UUID(int=7).bytes] * 2, pa.uuid()),
                             "score": [float("nan"), 1.5]}), inp)
    out = tmp_path / "out.jsonl"
    stats, _ = run_job(JobConfig(input=str(inp), output=str(out), model=llama_dir, engine={"dtype": "float32"},
                                 sampling={"max_tokens": 2}), tty=False)
    assert (stats.rows, stats.completed, stats.errors) == (2, 2, 0)
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in the output")) for line in
            out.read_text().splitlines()]
    assert [r["u"] for r in rows] == [str(uuid.UUID(int=7))] * 2 and [r["score"] for r in rows] == [None, 1.5]


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_a_parquet_map_column_is_an_object(llama_dir, tmp_path, out_name):
    """Found by a hunt: a map column came as a list of pairs, so a map-typed logit_bias was refused
    and a carried map was written to JSONL as pairs."""
    bias = pa.array([[("5", 100.0)], None], pa.map_(pa.string(), pa.float64()))
    sampling = pa.StructArray.from_arrays([bias], names=["logit_bias"])
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"], "sampling_params": sampling,
                             "tags": pa.array([[("k", "v")], []], pa.map_(pa.string(), pa.string()))}), inp)
    stats, rows = run(llama_dir, str(inp), tmp_path / out_name)
    assert (stats.completed, stats.errors) == (2, 0), rows
    by_id = {r["id"]: r for r in rows}
    assert set(by_id[1]["outputs"][0]["token_ids"]) == {5}  # the bias took effect
    tags = by_id[1]["tags"]
    assert (tags if out_name.endswith(".jsonl") else dict(tags)) == {"k": "v"}


def test_a_second_run_of_a_running_job_is_refused(tmp_path):
    """Found by a hunt: two runs of one job (a scheduler's requeue while the first still runs)
    both appended to the output."""
    import fcntl

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    config = JobConfig(input=inp, output=str(tmp_path / "out.jsonl"), model="/nonexistent/model")
    fd = os.open(tmp_path / "out.jsonl.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as the first run holds it
    with pytest.raises(ValueError, match="another run of this job is writing it"):
        run_job(config)
    os.close(fd)
    with pytest.raises(Exception, match="nonexistent"):  # now it runs (and fails on its model)
        run_job(config)
    assert not os.path.exists(tmp_path / "out.jsonl.lock")


def test_a_read_only_output_directory_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root passes a chmod; a read-only mount refuses
    with pytest.raises(ValueError, match="is not writable"):
        run_job(JobConfig(input=inp, output=str(tmp_path / "out.jsonl"), model="/nonexistent/model"))


def test_an_output_where_no_file_can_be_made_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """/proc passes the writable check as root but takes no new file (found by a hunt: a raw traceback)."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    with pytest.raises(ValueError, match="--output '/proc/out.jsonl': cannot create /proc/out.jsonl.lock: "):
        run_job(JobConfig(input=inp, output="/proc/out.jsonl", model="/nonexistent/model"))


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_prompt_logprobs_asked_for_are_written(llama_dir, tmp_path, out_name):
    rows = [{"id": 1, "prompt": "The capital of France is", "sampling_params": {"prompt_logprobs": 2}},
            {"id": 2, "prompt": "no prompt logprobs here"}]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / out_name)
    got = by_id(out)
    assert (stats.completed, stats.errors) == (2, 0) and got[2].get("prompt_logprobs") is None
    with LLM(llama_dir, **ENGINE) as llm:
        want = llm.generate(rows[0]["prompt"], SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=2))[0]
    written = got[1]["prompt_logprobs"]
    assert len(written) == got[1]["prompt_tokens"] == len(want.prompt_token_ids) and written[0] is None
    for entries, position in zip(written[1:], want.prompt_logprobs[1:]):
        assert [(e["token_id"], e["logprob"], e["rank"]) for e in entries] == [
            (t, lp.logprob, lp.rank) for t, lp in position.items()]


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_prompt_token_id_scores_and_traces_of_plain_rows(llama_dir, tmp_path, out_name):
    """A row's ``prompt_logprob_token_ids`` give ``prompt_token_id_logprobs`` (a padded id's -inf
    written as null in JSON); ``trace_decode_token_ids`` runs with the job's trace replay, and
    without it is the row's error; ``stream_interval`` is not a row's."""
    prompt = [1, 20, 21, 22, 23]
    rows = [{"id": 1, "prompt_token_ids": prompt, "sampling_params": {"prompt_logprob_token_ids": [[5, 6], [7], [8], [9]]}},
            {"id": 2, "prompt_token_ids": prompt, "sampling_params": {"trace_decode_token_ids": [30, 31, 32]}},
            {"id": 3, "prompt": "x", "sampling_params": {"stream_interval": 2}}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    config = JobConfig(input=inp, output=str(tmp_path / out_name), model=llama_dir, sampling={"max_tokens": 6},
                       engine={**ENGINE, "enable_trace_replay": True})
    stats, interrupted = run_job(config)
    got = by_id(read_output(tmp_path / out_name))
    assert interrupted is None and (stats.completed, stats.errors) == (2, 1)
    with LLM(llama_dir, **ENGINE) as llm:
        want = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
            max_tokens=6, prompt_logprob_token_ids=rows[0]["sampling_params"]["prompt_logprob_token_ids"]))[0]
    expected = [[None if v == float("-inf") and out_name.endswith("jsonl") else v for v in row]
                for row in want.prompt_token_id_logprobs.tolist()]
    assert got[1]["prompt_token_id_logprobs"] == expected and got[2].get("prompt_token_id_logprobs") is None
    assert got[2]["outputs"][0]["token_ids"] == [30, 31, 32]
    assert "stream_interval" in got[3]["error"] and "SamplingParams field(s) a job row cannot set" in got[3]["error"]
    config = JobConfig(input=inp, output=str(tmp_path / ("again_" + out_name)), model=llama_dir, engine=dict(ENGINE))
    run_job(config)
    again = by_id(read_output(tmp_path / ("again_" + out_name)))
    assert "pagedlm run and vLLM: --enable-trace-replay" in again[2]["error"] and again[1]["error"] is None
    from pagedlm.entrypoints.cli import run_main

    flagged = tmp_path / ("flag_" + out_name)
    run_main(["--input", inp, "--output", str(flagged), "--model", llama_dir, "--dtype", "float32",
              "--enable-trace-replay"])
    assert by_id(read_output(flagged))[2]["outputs"][0]["token_ids"] == [30, 31, 32]


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_cumulative_logprob_is_written_where_the_row_asked_for_logprobs(llama_dir, tmp_path, out_name):
    """vLLM's rule: null without logprobs (a greedy step then takes the argmax alone), with them the
    sum of the sampled tokens' log-probabilities."""
    rows = [{"id": 1, "prompt": "The capital of France is", "sampling_params": {"logprobs": 0}},
            {"id": 2, "prompt": "The capital of France is"}]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / out_name)
    got = by_id(out)
    scored, plain = got[1]["outputs"][0], got[2]["outputs"][0]
    assert (stats.completed, stats.errors) == (2, 0) and scored["token_ids"] == plain["token_ids"]
    assert plain["cumulative_logprob"] is None and plain.get("logprobs") is None
    chosen = [next(e["logprob"] for e in entries if e["token_id"] == t)
              for t, entries in zip(scored["token_ids"], scored["logprobs"])]
    assert scored["cumulative_logprob"] == pytest.approx(sum(chosen), abs=1e-4) and scored["cumulative_logprob"] < 0


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_values_an_output_cannot_hold_never_stop_the_job(llama_dir, tmp_path, out_name):
    big = 10**23  # beyond int64: pyarrow raises OverflowError, not an Arrow error
    rows = ['{"id": 1, "prompt": "fine"}', '{"id": 2, "prompt": "bad \\ud800"}',
            '{"id": 3, "prompt": "fine too", "note": "x\\udc80", "\\ud800": 1}',
            '{"id": 4, "prompt": "last", "big": %d}' % big,
            '{"id": %d, "prompt": "a big id"}' % big]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    stats, out = run(llama_dir, inp, tmp_path / out_name)
    got = {str(k): r for k, r in by_id(out).items()}  # ids beyond int64 make Parquet's id column text
    assert sorted(got) == sorted(map(str, [1, 2, 3, 4, big])) and (stats.completed, stats.errors) == (4, 1)
    assert "not valid Unicode" in got["2"]["error"] and got["1"]["error"] is None and got["4"]["error"] is None
    assert got["3"]["note"] in ("x\\udc80", "x\udc80")  # the surrogate kept as its escape
    # a key of one too (found by a hunt: Parquet's column name failed the job and every resume)
    assert got["3"].get("\\ud800", got["3"].get("\ud800")) == 1
    assert str(got["4"]["big"]) == str(big) and got[str(big)]["error"] is None
    stats, _ = run(llama_dir, inp, tmp_path / out_name, resume=True)
    assert (stats.skipped, stats.completed, stats.errors) == (5, 0, 0)


def test_openai_rows_with_null_fields_and_a_bad_first_row(llama_dir, tmp_path):
    def completion(custom_id, **body):
        return _openai_row(custom_id, "/v1/completions", {"prompt": "Hello", "temperature": 0, "ignore_eos": True,
                                                            **body})

    chat = [{"role": "user", "content": "Hi"}]
    rows = [
        {"custom_id": "no-body", "method": "POST", "url": "/v1/completions"},  # first: still OpenAI rows
        completion("nulls", stream=None, tools=None, response_format=None, logit_bias=None, max_tokens=None,
                   stream_options=None, n=None),
        _openai_row("chat-nulls", "/v1/chat/completions",
                    {"messages": chat, "chat_template": TEMPLATE, "max_completion_tokens": None, "max_tokens": 3,
                     "ignore_eos": True, "prompt": None, "tools": None}),
        completion("dup"), completion("dup"),
        {"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    with open(inp, "rb") as f:
        text = f.read()
    with open(inp, "wb") as f:  # with a byte-order mark, as Notepad writes
        f.write(b"\xef\xbb\xbf" + text)
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl", sampling={}, served_model_names=["tiny"])
    assert stats.completed == 3 and stats.errors == 3
    errors = {r["custom_id"]: r["response"]["body"]["error"] for r in out if r["error"]}
    assert errors["no-body"]["param"] == "body" and errors["dup"]["param"] == "custom_id"
    assert errors[7]["param"] == "custom_id" and "got 7" in errors[7]["message"]  # echoed, to join on
    usage = {r["custom_id"]: r["response"]["body"]["usage"] for r in out if not r["error"]}
    assert usage["nulls"]["completion_tokens"] == 16 and usage["chat-nulls"]["completion_tokens"] == 3


def test_openai_rows_from_parquet_mixing_endpoints(llama_dir, tmp_path):
    inp = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist([
        _openai_row("c", "/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
        _openai_row("m", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                                   "chat_template": TEMPLATE}),
    ]), inp)
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl")
    assert (stats.completed, stats.errors) == (2, 0), out


@pytest.mark.parametrize("change, message", [
    ({"max_in_flight": 0}, "--max-in-flight must be a positive integer"),
    ({"model": ""}, "--model must be a checkpoint directory, a .gguf file or a Hub id"),  # ran the default
    ({"progress_interval": -1.0}, "--progress-interval must be a finite number of seconds >= 0"),
    ({"progress_interval": float("inf")}, "--progress-interval must be a finite number of seconds >= 0"),
    ({"progress_interval": float("nan")}, "--progress-interval must be a finite number of seconds >= 0"),
    ({"output": "missing_dir/out.jsonl"}, "does not exist"),
    ({"output": "in.jsonl/out.jsonl"}, "the directory '.*in.jsonl' is not a directory"),
    ({"output": "outdir.jsonl"}, "'outdir.jsonl' is a directory; name the output file"),
    ({"output": "loose.parquet"}, "'loose.parquet.parts', where a Parquet output keeps its parts, is not a directory"),
    ({"output": "in.jsonl"}, "the same file"),
    ({"input": "s3://bucket/in.jsonl"}, "URIs are read and written by --ray jobs; a local job takes local paths"),
    ({"output": "file:///tmp/out.jsonl"}, "--output 'file:///tmp/out.jsonl': URIs are read and written by --ray jobs"),
    ({"input": "array.json"}, "holds a JSON array"),
    ({"input": "object.json"}, r"holds JSON spread over several lines \(pretty-printed\)"),
    ({"input": "object2.json"}, r"holds JSON spread over several lines \(pretty-printed\)"),
    ({"input": "utf16.jsonl"}, "is UTF-16 or UTF-32 text .*save it as UTF-8"),
    ({"input": "utf16be.jsonl"}, "is UTF-16 or UTF-32 text .*save it as UTF-8"),  # no byte-order mark: NUL bytes
    ({"input": "gzip.jsonl"}, "'gzip.jsonl' is gzip data; .*decompress it first"),
    # Found by a hunt: read as Latin-1 text (iconv's advice), or as one row's error.
    ({"input": "parquet.jsonl"}, "'parquet.jsonl' is a Parquet file; pagedlm run reads a file by its name: name it .parquet"),
    # Found by a hunt: a map's float values checked only in a struct (every row was max_tokens' error).
    # Found by a hunt: every row was its error (done for a resume).
    ({"input": "decimal.parquet"}, r"sampling_params.top_p is decimal128\(3, 2\); it must be numbers"),
    ({"input": "textual.parquet"}, r"sampling_params.max_tokens is string; it must be integers"),
    ({"input": "floats.parquet"}, r"sampling_params is map<string, double .*, and its rows set max_tokens, which must "
                                  "be integers"),
    # Found by a docs hunt: every row was an error (with no id) and the job exited 0.
    ({"input": "latin1.jsonl"}, r"'latin1.jsonl' is not UTF-8 \(byte 0xe9 on line 2, and 1 more line\(s\) in its "
                                r"first MiB: Latin-1 or Windows-1252"),
    ({"input": "cr.jsonl"}, "'cr.jsonl' has lines ended by CR alone"),
    ({"input": "commas.jsonl"}, r"'commas.jsonl' holds lines copied out of a JSON array \(its first line ends in '},'\)"),
    ({"input": "previous.parquet"}, r"'previous.parquet' has column\(s\) outputs, error, which the output writes"),
    ({"input": "previous.jsonl"}, r"'previous.jsonl' has column\(s\) outputs, prompt_tokens, completion_tokens, error, "),
    ({"input": "footer.parquet"}, r"'footer.parquet' is not a readable Parquet file \(OSError: Couldn't deserialize thrift"),
    ({"output": "started.parquet"}, r"'started.parquet': its job was started \(its parts directory "
                                    r"'started.parquet.parts' exists.*pass --resume"),
    ({"served_model_names": ["tiny"]}, "--served-model-name names the model of OpenAI batch rows"),
    ({"served_model_names": [""], "input_format": "openai"}, "--served-model-name must be a non-empty name"),
])
def test_bad_options_are_refused_before_the_model_loads(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    line = json.dumps({"id": 1, "prompt": "x"})
    write_jsonl(tmp_path / "in.jsonl", [line])
    (tmp_path / "utf16.jsonl").write_text(line + "\n", encoding="utf-16")  # as PowerShell's > writes
    (tmp_path / "utf16be.jsonl").write_text(line + "\n", encoding="utf-16-be")
    (tmp_path / "gzip.jsonl").write_bytes(gzip.compress((line + "\n").encode()))
    pq.write_table(pa.table({"id": [1], "prompt": ["x"]}), tmp_path / "parquet.jsonl")
    floats = pa.array([[("temperature", 0.5)], [("max_tokens", 3.0)]], pa.map_(pa.string(), pa.float64()))
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["x", "y"], "sampling_params": floats}), tmp_path / "floats.parquet")
    top_p = pa.array([{"top_p": decimal.Decimal("0.90")}], pa.struct([("top_p", pa.decimal128(3, 2))]))
    pq.write_table(pa.table({"id": [1], "prompt": ["x"], "sampling_params": top_p}), tmp_path / "decimal.parquet")
    pq.write_table(pa.table({"id": [1], "prompt": ["x"], "sampling_params": [{"max_tokens": "3"}]}),
                   tmp_path / "textual.parquet")
    (tmp_path / "latin1.jsonl").write_text(f'{line}\n{{"id": 2, "prompt": "caf\u00e9"}}\n{{"id": 3, "prompt": "\u00e0"}}\n',
                                           encoding="cp1252")
    (tmp_path / "cr.jsonl").write_bytes(f"{line}\r{line}\r".encode())
    (tmp_path / "commas.jsonl").write_text(f"{line},\n{line},\n")
    pq.write_table(pa.table({"id": [1], "prompt": ["a"], "outputs": [None], "error": ["x"]}), tmp_path / "previous.parquet")
    write_jsonl(tmp_path / "previous.jsonl", [{"id": 1, "prompt": "a", "outputs": [], "prompt_tokens": 1,
                                              "completion_tokens": 0, "error": None}])  # found by a hunt
    (tmp_path / "started.parquet.parts").mkdir()  # as an interrupted Parquet job leaves it
    (tmp_path / "outdir.jsonl").mkdir()
    (tmp_path / "loose.parquet.parts").write_text("x")
    pq.write_table(pa.table({"id": [1], "prompt": ["a"]}), tmp_path / "footer.parquet")
    with open(tmp_path / "footer.parquet", "r+b") as f:  # a torn footer (found by a hunt: a raw traceback)
        f.seek(-8, os.SEEK_END)
        f.write(b"\0" * 4)
    (tmp_path / "array.json").write_text(json.dumps([{"id": 1, "prompt": "x"}], indent=2))
    (tmp_path / "object.json").write_text("\n" + json.dumps({"id": 1, "prompt": "x"}, indent=2))
    (tmp_path / "object2.json").write_text('{"id": 1,\n "prompt": "x"}\n{"id": 2,\n "prompt": "y"}\n')
    config = JobConfig(**{"input": "in.jsonl", "output": "out.jsonl", "model": "/nonexistent/model", **change})
    with pytest.raises(ValueError, match=message):
        run_job(config)
    assert not os.path.exists(tmp_path / "out.jsonl")


def test_only_a_file_in_another_encoding_is_refused_up_front():
    """A sample of Latin-1 (lines that are not UTF-8 and no UTF-8 beyond ASCII) is refused; a
    sample that ends inside a character, one bad line among ASCII ones (a review: json.dumps
    writes ASCII, so one corrupt byte refused the whole file), or bad lines among UTF-8 ones are
    not: such a line is its row's error."""
    from pagedlm.entrypoints.jobs.runner import _not_json_lines

    latin1 = ('{"id": 1, "prompt": "caf\u00e9"}\n' * 3).encode("latin-1")
    assert _not_json_lines(latin1).startswith("is not UTF-8 (byte 0xe9 on line 1, and 2 more line(s)")
    ascii_rows = b'{"id": 1, "prompt": "x"}\n' * 3
    assert _not_json_lines(latin1[:len(latin1) // 3] + ascii_rows) is None
    sample = ('{"id": 1, "prompt": "\u00e9\u20ac"}\n' * 3).encode()
    assert _not_json_lines(sample) is None and _not_json_lines(sample[:-4]) is None  # ends inside the euro sign
    assert _not_json_lines(sample + latin1) is None


def test_a_first_row_longer_than_the_sample_is_not_judged_by_where_the_sample_cuts_it(tmp_path):
    """Found by a hunt: check_json_lines reads the file's first MiB, and a valid first row longer
    than that was refused as lines copied out of an array (the cut fell after "},") or as CR line
    endings (a CR between its keys is JSON whitespace); a file of CR-ended rows is still told."""
    from pagedlm.entrypoints.jobs.runner import _JSON_LINES_SAMPLE, check_json_lines

    second = json.dumps({"id": 2, "prompt": "b"}) + "\n"
    turns = [{"role": "user", "content": "x" * 100}] * (_JSON_LINES_SAMPLE // 100)

    def line(pad: int) -> str:
        return json.dumps({"id": 1, "pad": "z" * pad, "messages": turns})

    # The sample's end moved to just after a "}," of the list (a turn's length in padding at most).
    line = line(next(n for n in range(200) if line(n)[:_JSON_LINES_SAMPLE].endswith("},")))
    assert len(line) > _JSON_LINES_SAMPLE
    (tmp_path / "long.jsonl").write_text(line + "\n" + second)
    (tmp_path / "long_cr.jsonl").write_text('{"id": 1,\r"prompt": "a", "pad": "' + "z" * _JSON_LINES_SAMPLE + '"}\n' + second)
    for name in ("long.jsonl", "long_cr.jsonl"):
        check_json_lines(str(tmp_path / name))
    row = json.dumps({"id": 1, "prompt": "a", "pad": "z" * 1000})
    (tmp_path / "cr.jsonl").write_text((row + "\r") * 2000)  # CR-ended rows past the sample
    with pytest.raises(ValueError, match="has lines ended by CR alone"):
        check_json_lines(str(tmp_path / "cr.jsonl"))


def test_an_array_file_is_told_from_json_lines_whose_first_row_is_an_array():
    """Found by a hunt: JSON Lines whose first row was an array (one bad row) were refused whole as
    an array file, with jq's advice; the same line as the second row was only its row's error."""
    from pagedlm.entrypoints.jobs.runner import _not_json_lines

    rows = b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n'
    assert _not_json_lines(b"[1, 2]\n" + rows) is None
    assert _not_json_lines(b'[{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}]\n').startswith("holds a JSON array")
    assert _not_json_lines(b'[{"id": 1, "prompt": "a"},\n{"id": 2, "prompt": "b"}]\n').startswith("holds a JSON array")
    assert _not_json_lines(b"[1, 2]\n\n  \n").startswith("holds a JSON array")
    batched = b'[{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}]\n\n[{"id": 3, "prompt": "c"}]\n'
    assert _not_json_lines(batched).startswith("holds a JSON array")  # a review: an array a line


def test_a_bad_engine_setting_leaves_no_job_behind(llama_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_job(JobConfig(input=inp, output=str(tmp_path / "out.jsonl"), model=llama_dir, engine={"dtype": "foo"}))
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_served_model_names_and_the_job_record(llama_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [
        _openai_row("a", "/v1/completions", {"model": os.path.basename(llama_dir), "prompt": "x", "max_tokens": 1}),
        _openai_row("b", "/v1/completions", {"model": "gpt-4o", "prompt": "x", "max_tokens": 1})])
    config = JobConfig(input=inp, output=str(tmp_path / "out.jsonl"), model=llama_dir + "/", engine=dict(ENGINE))
    stats, _ = run_job(config, tty=False)
    assert stats.completed == 1  # --model with a trailing slash still answers to its basename
    refused = by_id(read_output(tmp_path / "out.jsonl"), "custom_id")["b"]["error"]["message"]
    assert os.path.basename(llama_dir) in refused and "(or start the job with --served-model-name)" in refused
    record = json.load(open(str(tmp_path / "out.jsonl") + ".job.json"))
    assert record["input"] == os.path.abspath(inp)
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": 1, "prompt": "x"}])
    with pytest.raises(ValueError, match="input: started with"):
        run_job(JobConfig(input=other, output=str(tmp_path / "out.jsonl"), model=llama_dir + "/", resume=True,
                          engine=dict(ENGINE)))
    # Settings that change the rows' outputs are part of the record; explicit defaults are not.
    from pagedlm.entrypoints.jobs.runner import check_record, job_record

    import torch

    engine = dict(ENGINE, block_size=16, seed=0, hf_overrides={"rms_norm_eps": 1e-5, "torch_dtype": torch.float32},
                  override_generation_config={"temperature": 0.5}, max_logprobs=5)
    recorded = job_record(JobConfig(input=inp, output="o.jsonl", model=llama_dir, engine=engine), "plain")["engine"]
    assert recorded == {"hf_overrides": {"rms_norm_eps": 1e-5, "torch_dtype": "torch.float32"}, "max_logprobs": 5,
                        "override_generation_config": {"temperature": 0.5},
                        **{k: v for k, v in ENGINE.items() if k in ("dtype", "max_model_len")}}
    # The job's own default (found by a hunt: --resume --max-logprobs 20 was refused as another job)
    recorded = job_record(JobConfig(input=inp, output="o.jsonl", model=llama_dir, engine={"max_logprobs": 20}), "plain")
    assert recorded["engine"] == {}
    resumed = JobConfig(input=inp, output=str(tmp_path / "o.jsonl"), resume=True)
    (tmp_path / "o.jsonl.job.json").write_text(json.dumps(dict(recorded, engine={"max_logprobs": 20})))  # as before
    check_record(resumed, recorded, started=True)
    (tmp_path / "o.jsonl.job.json").write_text(json.dumps(dict(recorded, engine={"batch_invariant": True})))
    check_record(resumed, recorded, started=True)
    # vLLM's aliases are one setting (found by a hunt: --dtype half did not resume as float16, nor
    # --kv-cache-dtype fp8 as fp8_e4m3), also against a record written before they were.
    aliased = job_record(JobConfig(input=inp, output="o.jsonl", model=llama_dir,
                                   engine={"dtype": "half", "kv_cache_dtype": "fp8"}), "plain")
    assert aliased["engine"] == {"dtype": "float16", "kv_cache_dtype": "fp8_e4m3"}
    (tmp_path / "o.jsonl.job.json").write_text(json.dumps(dict(aliased, engine={"dtype": "fp16", "kv_cache_dtype": "fp8"})))
    check_record(resumed, aliased, started=True)
    # kv_cache_dtype 'bfloat16' names the model's own dtype (the engine refuses it otherwise): the
    # default's setting (a review: a job started with it could not resume without it).
    own = job_record(JobConfig(input=inp, output="o.jsonl", model=llama_dir,
                               engine={"dtype": "bfloat16", "kv_cache_dtype": "bfloat16"}), "plain")
    assert own["engine"] == {"dtype": "bfloat16"}


def test_a_chat_template_for_the_job_renders_its_chats_and_is_part_of_its_record(llama_dir, tmp_path):
    """``--chat-template`` (LLM's ``chat_template``) reaches rows rendered by the job; a resume with
    another template is another job."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "messages": [{"role": "user", "content": "Hi"}]}])
    out = tmp_path / "out.jsonl"
    template_file = tmp_path / "template.jinja"  # recorded as its text: an edited file is another job
    template_file.write_text(TEMPLATE)
    config = JobConfig(input=inp, output=str(out), model=llama_dir, engine=dict(ENGINE, chat_template=str(template_file)),
                       sampling={"max_tokens": 2})
    stats, _ = run_job(config, tty=False)
    expected = AutoTokenizer.from_pretrained(llama_dir).apply_chat_template(
        [{"role": "user", "content": "Hi"}], chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"]
    assert stats.completed == 1 and read_output(out)[0]["prompt_tokens"] == len(expected)
    assert json.load(open(str(out) + ".job.json"))["engine"]["chat_template"] == TEMPLATE
    template_file.write_text(TEMPLATE + " ")
    with pytest.raises(ValueError, match="chat_template"):
        run_job(JobConfig(input=inp, output=str(out), model=llama_dir, resume=True,
                          engine=dict(ENGINE, chat_template=str(template_file)), sampling={"max_tokens": 2}))


def test_a_refused_job_says_why_without_the_usage_and_rows_name_json_types(llama_dir, tmp_path, capsys):
    """Found by a docs walk: a job refused after its flags parsed printed the ~45 lines of usage
    before its reason, and a row of null or a list was "got NoneType" / "got list"."""
    from pagedlm.entrypoints.cli import run_main

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, None, [1, 2],
                                              {"id": 4, "prompt": "b", "sampling_params": [1]}])
    args = ["--input", inp, "--output", str(tmp_path / "out.jsonl"), "--model", llama_dir, "--max-tokens", "2"]
    assert run_main(args) == 0
    errors = " | ".join(r["error"] or "" for r in read_output(tmp_path / "out.jsonl"))
    assert "line 2: a row must be an object with an id and a prompt, got null" in errors
    assert "line 3: a row must be an object with an id and a prompt, got [1, 2]" in errors
    assert "sampling_params must be an object, got [1]" in errors
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(args)  # the output exists
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage:" not in err and err.startswith("pagedlm run: error: --output")


def test_a_rows_own_chat_template_needs_the_job_to_trust_it(llama_dir, tmp_path):
    """Found by a hunt: a row's template of two nested range(100000) loops held the whole job (no
    row was written). As vLLM's server, a job takes a row's own template only with
    --trust-request-chat-template; without it that row is its error and the others run."""
    from pagedlm.entrypoints.cli import run_main

    chat = [{"role": "user", "content": "Hi"}]
    stall = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    rows = [{"id": 1, "prompt": "a"}, {"id": 2, "messages": chat, "chat_template": stall},
            {"id": 4, "messages": chat, "chat_template_kwargs": {"chat_template": stall}},  # render_chat takes it too
            _openai_row("3", "/v1/chat/completions", {"messages": chat, "chat_template": TEMPLATE})]
    inp = write_jsonl(tmp_path / "in.jsonl", rows[:3])
    _, out = run(llama_dir, inp, tmp_path / "out.jsonl", trust_request_chat_template=False)
    got = by_id(out)
    assert got[1]["error"] is None
    for key, line in ((2, 2), (4, 3)):
        assert got[key]["error"].startswith(f"line {line}: chat_template: a row's own chat template is taken only "
                                            "with --trust-request-chat-template")
    _, out = run(llama_dir, write_jsonl(tmp_path / "b.jsonl", rows[3:]), tmp_path / "b.out.jsonl",
                 trust_request_chat_template=False)
    assert out[0]["response"]["body"]["error"]["param"] == "chat_template"
    assert "body.chat_template: a row's own chat template" in out[0]["response"]["body"]["error"]["message"]
    args = ["--input", write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "messages": chat, "chat_template": TEMPLATE}]),
            "--model", llama_dir, "--max-tokens", "2", "--dtype", "float32"]
    assert run_main(args + ["--output", str(tmp_path / "c.out.jsonl"), "--trust-request-chat-template"]) == 0
    assert read_output(tmp_path / "c.out.jsonl")[0]["error"] is None
    record = json.load(open(tmp_path / "c.out.jsonl.job.json"))
    assert record["trust_request_chat_template"] is True
    with pytest.raises(ValueError, match="trust_request_chat_template: started with True, now False"):
        run(llama_dir, tmp_path / "c.jsonl", tmp_path / "c.out.jsonl", resume=True, trust_request_chat_template=False,
            sampling={"max_tokens": 2})
    # A job recorded before the flag goes on as the resuming run says (its record has no such key).
    inp = write_jsonl(tmp_path / "d.jsonl", rows[:1])
    run(llama_dir, inp, tmp_path / "d.out.jsonl")
    record_path = tmp_path / "d.out.jsonl.job.json"
    record = json.loads(record_path.read_text())
    del record["trust_request_chat_template"]
    record_path.write_text(json.dumps(record))
    stats, _ = run(llama_dir, inp, tmp_path / "d.out.jsonl", resume=True, trust_request_chat_template=False)
    assert stats.skipped == 1


def test_a_rows_chat_template_is_never_read_from_a_file(llama_dir, tmp_path):
    """Found by a hunt: a row's chat_template naming a local file rendered the file's text into the
    prompt (a plain row got it back through prompt_logprobs), as vLLM's server refuses to."""
    secret = tmp_path / "secret.txt"
    secret.write_text("OP-SECRET {{ messages[0].content }}")
    messages = [{"role": "user", "content": "Hi"}]
    rows = [{"id": 1, "messages": messages, "chat_template": str(secret)},
            {"id": 2, "messages": messages, "chat_template": TEMPLATE}]
    _, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = by_id(out)
    assert got[1]["error"].startswith(f"line 1: chat_template must be a Jinja template; '{secret}' is none, and a "
                                      "row's template is not read from a file"), got[1]["error"]
    assert got[2]["error"] is None
    chat = _openai_row("c", "/v1/chat/completions", {"messages": messages, "chat_template": str(secret)})
    _, out = run(llama_dir, write_jsonl(tmp_path / "c.jsonl", [chat]), tmp_path / "c.out.jsonl")
    assert out[0]["response"]["body"]["error"]["param"] == "chat_template"


def test_progress_lines_come_while_rows_run(capsys):
    from pagedlm.entrypoints.jobs.progress import JobStats, Progress

    stats = JobStats(rows=3, completed=1)
    progress = Progress(stats, total=10, interval=0.01, tty=False)
    deadline = time.monotonic() + 30
    while "rows 1/10" not in capsys.readouterr().err and time.monotonic() < deadline:
        time.sleep(0.01)  # no row finishes: the thread still prints
    assert time.monotonic() < deadline
    progress.close()
    assert stats.summary(False)["unfinished"] == 2


def test_a_job_on_a_loaded_llm_leaves_it_open(llama_dir, tmp_path):
    from pagedlm.entrypoints.jobs import JobConfig as PublicJobConfig, run_job as public_run_job

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Hello {i}"} for i in range(3)])
    with LLM(llama_dir, **ENGINE) as llm:
        config = PublicJobConfig(input=inp, output=str(tmp_path / "out.jsonl"), sampling={"max_tokens": 2})
        stats, interrupted = public_run_job(config, tty=False, llm=llm)
        assert (stats.completed, interrupted) == (3, None)
        assert len(llm.generate("still open", SamplingParams(max_tokens=1), use_tqdm=False)) == 1
        with pytest.raises(ValueError, match="leave JobConfig.model and JobConfig.engine unset"):
            public_run_job(JobConfig(input=inp, output=str(tmp_path / "o2.jsonl"), model=llama_dir), llm=llm)


def test_openai_rows_take_vllm_s_cache_salt(llama_dir, tmp_path):
    """vLLM's ``cache_salt`` body field (found by a review: refused): rows of one salt share their
    prompt's cached blocks, other salts do not, and the outputs are the same."""
    prefix = "The quick brown fox jumps over the lazy dog. " * 4
    body = {"prompt": prefix, "max_tokens": 2, "temperature": 0}
    chat = {"messages": [{"role": "user", "content": prefix}], "chat_template": TEMPLATE, "max_tokens": 2, "temperature": 0}
    rows = [_openai_row("a1", "/v1/completions", {**body, "cache_salt": "a"}),
            _openai_row("c1", "/v1/chat/completions", {**chat, "cache_salt": "a"}),
            _openai_row("bad", "/v1/completions", {**body, "cache_salt": 5}),
            _openai_row("empty", "/v1/completions", {**body, "cache_salt": ""})]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl", sampling={})
    got = by_id(out, "custom_id")
    assert (stats.completed, stats.errors) == (2, 2)
    assert got["bad"]["response"]["body"]["error"]["param"] == "cache_salt"
    assert "cache_salt must be a non-empty str" in got["empty"]["error"]["message"]
    assert got["empty"]["response"]["body"]["error"]["param"] == "cache_salt"  # a hunt: it was null
    with LLM(llama_dir, **ENGINE) as llm:
        for salt, row in (("a", "a1"), (None, "a1")):
            prompt = {"prompt": prefix, **({"cache_salt": salt} if salt else {})}
            assert llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0].outputs[0].text \
                == got[row]["response"]["body"]["choices"][0]["text"]
    from pagedlm.entrypoints.jobs.openai_batch import OpenAIBatchFormat

    fmt = OpenAIBatchFormat(AutoTokenizer.from_pretrained(llama_dir), ["tiny"], {}, trust_request_chat_template=True)
    assert fmt.parse(rows[0], "a1").prompt == {"prompt": prefix, "cache_salt": "a"}
    assert fmt.parse(rows[1], "c1").prompt.cache_salt == "a"


def test_openai_response_format_constrains_the_output(llama_dir, tmp_path):
    schema = {"type": "string", "enum": ["alpha", "beta"]}
    rows = [
        _openai_row("schema", "/v1/completions", {"prompt": "Hello", "max_tokens": 10, "temperature": 1.0, "seed": 1,
                                                  "logprobs": 5, "response_format": {"type": "json_schema",
                                                                      "json_schema": {"name": "x", "schema": schema}}}),
        _openai_row("text", "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "response_format": {"type": "text"}}),
        _openai_row("bad-type", "/v1/completions", {"prompt": "Hello", "response_format": {"type": "yaml"}}),
        _openai_row("bad-schema", "/v1/completions", {"prompt": "Hello", "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}}),
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl", sampling={})
    got = by_id(out, "custom_id")
    assert (stats.completed, stats.errors) == (2, 2)
    choice = got["schema"]["response"]["body"]["choices"][0]
    assert json.loads(choice["text"]) in ("alpha", "beta")
    # Tokens the grammar forbids have logprob -inf: OpenAI's schema wants a number, and vLLM writes -9999.0.
    top = [value for position in choice["logprobs"]["top_logprobs"] for value in position.values()]
    assert -9999.0 in top and all(isinstance(v, float) and v >= -9999.0 for v in top + choice["logprobs"]["token_logprobs"])
    assert got["bad-type"]["response"]["body"]["error"]["param"] == "response_format"
    assert got["bad-schema"]["error"]["message"] == ("line 4: response_format.json_schema.schema: properties must be "
                                                     "an object")


def test_openai_completions_take_token_ids_and_a_list_of_one_prompt(llama_dir, reference, tmp_path):
    """OpenAI's completions prompt forms (found by a differential run against vLLM's server: only
    a string was taken); several prompts in one row are refused."""
    ids = AutoTokenizer.from_pretrained(llama_dir)("Hello 1").input_ids
    body = {"max_tokens": 6, "temperature": 0}
    rows = [_openai_row("ids", "/v1/completions", {"prompt": ids, **body}),
            _openai_row("one-ids", "/v1/completions", {"prompt": [ids], **body}),
            _openai_row("one-text", "/v1/completions", {"prompt": ["Hello 1"], **body}),
            _openai_row("two", "/v1/completions", {"prompt": ["a", "b"], **body}),
            _openai_row("empty", "/v1/completions", {"prompt": [], **body}),
            _openai_row("floats", "/v1/completions", {"prompt": [1.5], **body})]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", sampling={})
    got = by_id(out, "custom_id")
    [[expected]] = reference([{"prompt_token_ids": ids}])
    for key in ("ids", "one-ids", "one-text"):
        choice = got[key]["response"]["body"]["choices"][0]
        assert choice["text"] == expected.text and got[key]["response"]["body"]["usage"]["prompt_tokens"] == len(ids)
    assert {key: param for key, (param, _) in _errors(out).items()} == {"two": "prompt", "empty": "prompt", "floats": "prompt"}
    assert "one prompt per row" in _errors(out)["two"][1]


def test_a_lone_surrogate_inside_a_nested_value_keeps_its_parquet_column_s_type(llama_dir, tmp_path):
    """Found by a hunt: a lone surrogate (a JSON escape) inside a carried object, or inside an
    error row's messages, made pyarrow refuse the column, which was then written as JSON text for
    every row of the output. The surrogate is written as its escape and the column keeps its type."""
    rows = ['{"id": "a", "prompt": "Hello", "meta": {"tag": "x\\ud800", "\\udc80k": 1}}',
            '{"id": "b", "prompt": "Hello", "meta": {"tag": "ok"}}',
            '{"id": "c", "messages": [{"role": "user", "content": "x\\ud800"}], "chat_template": %s}' % json.dumps(TEMPLATE),
            '{"id": "d", "messages": [{"role": "user", "content": "fine"}], "chat_template": %s}' % json.dumps(TEMPLATE)]
    stats, _ = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.parquet")
    assert (stats.completed, stats.errors) == (3, 1)
    table = pq.read_table(tmp_path / "out.parquet")
    assert pa.types.is_struct(table.schema.field("meta").type)
    assert pa.types.is_list(table.schema.field("messages").type)
    got = by_id(table.to_pylist())
    assert got["a"]["meta"]["tag"] == "x\\ud800" and got["a"]["meta"]["\\udc80k"] == 1 and got["b"]["meta"]["tag"] == "ok"
    assert got["c"]["messages"][0]["content"] == "x\\ud800" and "not valid Unicode" in got["c"]["error"]


def test_parquet_output_of_empty_objects_and_surrogate_ids_resumes(llama_dir, tmp_path):
    """``{}`` values make a struct without fields, which Parquet cannot store, and values nested
    deeper than Parquet readers take (50 lists; 99 objects) a schema no part could be read back
    in: those columns are JSON text, and the job finishes. An id with a lone surrogate is written as
    its escape and matched in that form on resume (not run again)."""
    lists, objects = "[" * 50 + "1" + "]" * 50, '{"x": ' * 99 + "1" + "}" * 99
    rows = ['{"id": 1, "prompt": "a", "sampling_params": {}, "meta": [{}], "deep": ' + lists + "}",
            '{"id": "x\\ud800", "prompt": "b", "sampling_params": {}, "meta": {"a": {}}, "deep": null}',
            '{"id": 3, "prompt": "c", "deeper": ' + objects + ', "fine": ' + "[" * 49 + "]" * 49 + "}"]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    stats, first = run(llama_dir, inp, out)
    assert (stats.completed, stats.errors) == (3, 0)
    assert sorted(r["meta"] for r in first if r["meta"]) == ['[{}]', '{"a": {}}']
    assert {r["sampling_params"] for r in first} == {"{}", None}
    by = {r["prompt"]: r for r in first}
    assert json.loads(by["a"]["deep"]) == json.loads(lists) and json.loads(by["c"]["deeper"]) == json.loads(objects)
    assert pq.read_schema(out).field("fine").type != pa.string()  # 49 lists: stored as lists
    stats, again = run(llama_dir, inp, out, resume=True)
    assert (stats.skipped, stats.completed, stats.errors) == (3, 0, 0) and again == first


def test_openai_rows_check_booleans_and_name_the_body_field(llama_dir, tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi"}], "chat_template": TEMPLATE}
    rows = [
        _openai_row("lp-no", "/v1/chat/completions", {**chat, "logprobs": "no"}),
        _openai_row("agp", "/v1/chat/completions", {**chat, "add_generation_prompt": "yes"}),
        _openai_row("mct", "/v1/chat/completions", {**chat, "max_completion_tokens": "5"}),
        _openai_row("tlp", "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": -2}),
        _openai_row("stop-ids", "/v1/completions", {"prompt": "x", "stop": "y", "stop_token_ids": [-1]}),
        _openai_row("ok", "/v1/chat/completions", {**chat, "logprobs": False}),
        # An integer in OpenAI's API: true stays an error now that SamplingParams reads it as 1 (vLLM's).
        _openai_row("lp-true", "/v1/completions", {"prompt": "x", "logprobs": True}),
        _openai_row("bias", "/v1/completions", {"prompt": "x", "logit_bias": {"42": 100}, "max_tokens": 3, "temperature": 0,
                                                "ignore_eos": True}),
    ]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = {r["custom_id"]: r for r in out}
    params = {k: r["response"]["body"].get("error", {}).get("param") for k, r in got.items()}
    assert params == {"lp-no": "logprobs", "agp": "add_generation_prompt", "mct": "max_completion_tokens",
                      "tlp": "top_logprobs", "stop-ids": "stop_token_ids", "ok": None, "bias": None, "lp-true": "logprobs"}
    assert "body.logprobs must be true or false" in got["lp-no"]["error"]["message"]
    assert got["lp-true"]["error"]["message"].endswith(": body.logprobs must be an integer, got true")
    assert "max_completion_tokens must be" in got["mct"]["error"]["message"]
    assert got["ok"]["response"]["status_code"] == 200 and got["ok"]["response"]["body"]["choices"][0]["logprobs"] is None
    tok = AutoTokenizer.from_pretrained(llama_dir)
    assert got["bias"]["response"]["body"]["choices"][0]["text"] == tok.decode([42] * 3)  # OpenAI's string ids


def test_openai_integer_fields_that_samplingparams_would_not_check_are_checked_as_written(llama_dir, tmp_path):
    """A hunt: max_tokens beside max_completion_tokens (which replaces it) and completions' logprobs
    beside logprob_token_ids (whose count it does not read) were accepted whatever they held, and
    true for top_logprobs or prompt_logprobs was taken as 1."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "chat_template": TEMPLATE}
    rows = [
        _openai_row("mt-text", "/v1/chat/completions", {**chat, "max_completion_tokens": 2, "max_tokens": "abc"}),
        _openai_row("mt-low", "/v1/chat/completions", {**chat, "max_completion_tokens": 2, "max_tokens": -5}),
        _openai_row("mt-false", "/v1/chat/completions", {**chat, "max_completion_tokens": 2, "max_tokens": False}),
        _openai_row("lp-float", "/v1/completions", {"prompt": "x", "max_tokens": 2, "logprob_token_ids": [1],
                                                    "logprobs": 2.5}),
        _openai_row("tlp-true", "/v1/chat/completions", {**chat, "max_completion_tokens": 2, "logprobs": True,
                                                         "top_logprobs": True}),
        _openai_row("plp-true", "/v1/chat/completions", {**chat, "max_completion_tokens": 2, "prompt_logprobs": True}),
        _openai_row("ok", "/v1/chat/completions", {**chat, "max_completion_tokens": 2, "max_tokens": 7}),
        _openai_row("min", "/v1/chat/completions", {**chat, "max_completion_tokens": 2, "min_tokens": 5}),
        _openai_row("ok-ids", "/v1/completions", {"prompt": "x", "max_tokens": 2, "logprob_token_ids": [1], "logprobs": 0}),
    ]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = {r["custom_id"]: r["response"]["body"] for r in out}
    params = {k: body.get("error", {}).get("param") for k, body in got.items()}
    assert params == {"mt-text": "max_tokens", "mt-low": "max_tokens", "mt-false": "max_tokens", "lp-float": "logprobs",
                      "tlp-true": "top_logprobs", "plp-true": "prompt_logprobs", "ok": None, "ok-ids": None,
                      "min": "min_tokens"}
    # The text names the other field by the row's name too (it said max_tokens).
    assert got["min"]["error"]["message"].endswith("min_tokens (5) must be <= max_completion_tokens (2).")
    assert got["mt-low"]["error"]["message"].endswith("body.max_tokens must be at least 1, got -5 (max_completion_tokens "
                                                      "replaces it: give one)")
    assert got["tlp-true"]["error"]["message"].endswith("body.top_logprobs must be an integer, got true")
    assert got["ok"]["usage"]["completion_tokens"] <= 2


def test_plain_rows_with_a_custom_id_column_stay_plain_and_sampling_columns_are_warned_of(llama_dir, tmp_path, monkeypatch):
    from pagedlm.entrypoints.jobs import plain_rows

    warnings = []
    monkeypatch.setattr(plain_rows.logger, "warning", lambda message, *args: warnings.append(message % args))
    rows = [{"id": 1, "custom_id": "mine-1", "url": "https://example.com/1", "prompt": "Hello", "max_tokens": 3,
             "temperature": 0.5},
            {"id": 2, "prompt": "World", "max_tokens": 3}]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    assert (stats.completed, stats.errors) == (2, 0) and by_id(out)[1]["custom_id"] == "mine-1"
    assert by_id(out)[1]["url"] == "https://example.com/1"
    assert len(warnings) == 1 and "max_tokens, temperature are named like sampling parameters" in warnings[0]


def test_plain_rows_with_openai_constraint_columns_are_their_errors(llama_dir, tmp_path):
    """A hunt: a plain row's tool_choice (or parallel_tool_calls, response_format) was carried to
    the output and the row ran unconstrained; a null one is unset, as every column of a row."""
    conversation = [{"role": "user", "content": "Hi"}]
    rows = [{"id": 1, "messages": conversation, "tool_choice": "required"},
            {"id": 2, "messages": conversation, "parallel_tool_calls": False},
            {"id": 3, "prompt": "Hello", "response_format": {"type": "json_object"}},
            {"id": 4, "prompt": "Hello", "structured_outputs": {"choice": ["a"]}},
            {"id": 5, "prompt": "Hello", "guided_choice": ["a"]},
            # What constrains nothing is carried (a review: OpenAI request logs hold these defaults).
            {"id": 6, "prompt": "Hello", "tool_choice": None, "parallel_tool_calls": True,
             "response_format": {"type": "text", "json_schema": None}},
            {"id": 7, "prompt": "Hello", "tool_choice": "auto"},
            {"id": 8, "prompt": "Hello", "tool_choice": "none"}]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = by_id(out)
    assert (stats.completed, stats.errors) == (3, 5) and got[6]["error"] is None and got[6]["parallel_tool_calls"]
    for key, column, where in ((1, "tool_choice", "body.tool_choice"), (2, "parallel_tool_calls", "body.parallel_tool_calls"),
                               (3, "response_format", "sampling_params.structured_outputs"),
                               (4, "structured_outputs", "set sampling_params.structured_outputs"),
                               (5, "guided_choice", "set sampling_params.structured_outputs")):
        assert f"column {column} would constrain the completion" in got[key]["error"] and where in got[key]["error"]


def test_resume_of_openai_rows_refuses_a_model_named_otherwise(llama_dir, tmp_path):
    """A hunt: --model named by another path on resume was taken (the record holds it absolute), but
    the names body.model may give, and the responses' model, came from its spelling: a body was
    refused in one run and served in the next. A job recorded before the names were goes on."""
    rows = [_openai_row(f"r{i}", "/v1/completions", {"prompt": f"Hi {i}", "model": llama_dir}) for i in range(2)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows[:1]), tmp_path / "out.jsonl"
    run(llama_dir, inp, out)
    write_jsonl(inp, rows)
    with pytest.raises(ValueError, match="served_model_names: started with .*, now .*" + re.escape(llama_dir + "/")):
        run(llama_dir + "/", inp, out, resume=True)
    record = tmp_path / "out.jsonl.job.json"
    recorded = json.loads(record.read_text())
    assert recorded["served_model_names"][0] == llama_dir
    record.write_text(json.dumps({**recorded, "served_model_names": None}))
    with pytest.raises(ValueError, match=r"served_model_names: started with None, now \['other'\]"):
        run(llama_dir, inp, out, resume=True, served_model_names=["other"])  # a review: this was taken
    stats, got = run(llama_dir, inp, out, resume=True)
    assert (stats.skipped, stats.completed, stats.errors) == (1, 1, 0)
    assert [r["response"]["body"]["model"] for r in got] == [llama_dir, llama_dir]


def test_resume_refuses_other_engine_settings_that_change_outputs(llama_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Hello {i}"} for i in range(2)])
    out = tmp_path / "out.jsonl"
    run(llama_dir, inp, out)
    with pytest.raises(ValueError, match="engine: started with .*'dtype': 'float32'.*now .*'dtype': 'bfloat16'"):
        run_job(JobConfig(input=inp, output=str(out), model=llama_dir, resume=True, sampling={"temperature": 0.0, "max_tokens": 6},
                          engine={**ENGINE, "dtype": "bfloat16"}))
    stats, _ = run(llama_dir, inp, out, resume=True)  # the same settings: nothing left to run
    assert stats.skipped == 2
    stats, _ = run_job(JobConfig(input=inp, output=str(out), model=llama_dir, resume=True,
                                 sampling={"temperature": 0.0, "max_tokens": 6}, engine={**ENGINE, "device": "auto"},
                                 trust_request_chat_template=True))
    assert stats.skipped == 2  # a default given explicitly is the same job
    # Found by a review: batch_invariant=True, what its default (None) is wherever True is accepted
    stats, _ = run_job(JobConfig(input=inp, output=str(out), model=llama_dir, resume=True,
                                 sampling={"temperature": 0.0, "max_tokens": 6},
                                 engine={**ENGINE, "batch_invariant": True}, trust_request_chat_template=True))
    assert stats.skipped == 2
    # Found by a hunt: trace replay was not recorded, and a resume without it failed the rows that trace
    traced = JobConfig(input=inp, output=str(tmp_path / "traced.jsonl"), model=llama_dir,
                       engine={**ENGINE, "enable_trace_replay": True})
    run_job(traced)
    with pytest.raises(ValueError, match="engine: started with .*'enable_trace_replay': True"):
        run_job(dataclasses.replace(traced, engine=dict(ENGINE), resume=True))


def test_a_parquet_struct_s_nulls_are_unset_inside_object_fields_too():
    """Arrow unifies the rows' sampling_params into one struct: each row gets the other rows' keys
    as nulls, inside logit_bias and structured_outputs too (found by a hunt for logit_bias; the
    same nulls refused structured_outputs.disable_any_whitespace)."""
    from pagedlm.entrypoints.jobs.plain_rows import PlainFormat

    rows = pa.Table.from_pylist([
        {"id": 1, "prompt": "a", "sampling_params": {"logit_bias": {"5": 2.0}, "structured_outputs": {"regex": "a+"}}},
        {"id": 2, "prompt": "b", "sampling_params": {"logit_bias": {"7": -2.0},
                                                   "structured_outputs": {"json_object": True, "disable_any_whitespace": True}}},
    ]).to_pylist()
    assert rows[0]["sampling_params"]["structured_outputs"]["disable_any_whitespace"] is None  # as Arrow gives it
    fmt = PlainFormat(None, {})
    first, second = (fmt.parse(row, row["id"]).params for row in rows)
    assert first.logit_bias == {5: 2.0} and first.structured_outputs.regex == "a+"
    assert second.logit_bias == {7: -2.0} and second.structured_outputs.disable_any_whitespace


def test_a_parquet_struct_s_nulls_do_not_reach_a_plain_row_s_tools(llama_dir):
    """The chat template rendered another row's tool keys as nulls ("parameters": null) in a
    Parquet plain row (found on re-reading the Arrow-null fix: the same kind)."""
    from pagedlm.entrypoints.jobs.plain_rows import PlainFormat

    template = "{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}"
    tools = [{"type": "function", "function": {"name": "a", "description": "x"}},
             {"type": "function", "function": {"name": "b", "parameters": {"type": "object"}}}]
    rows = pa.Table.from_pylist([{"id": i, "messages": [{"role": "user", "content": "hi"}], "tools": [tool],
                                  "chat_template": template} for i, tool in enumerate(tools)]).to_pylist()
    fmt = PlainFormat(AutoTokenizer.from_pretrained(llama_dir), {}, arrow_rows=True, trust_request_chat_template=True)
    assert [fmt.parse(row, row["id"]).prompt.text for row in rows] == [json.dumps([tool]) + "hi" for tool in tools]


@pytest.fixture
def pagedlm_log(caplog):
    """caplog over the pagedlm logger (it does not propagate to the root logger)."""
    logger = logging.getLogger("pagedlm")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_input_format_is_detected_from_the_first_row_that_looks_like_one(llama_dir, tmp_path, pagedlm_log):
    """Rows that look like neither format (``null``, an OpenAI row without its custom_id) are
    passed over: they no longer make a file of OpenAI rows plain, failing every row."""
    completion = _openai_row("a", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    no_custom_id = {k: v for k, v in completion.items() if k != "custom_id"}
    inp = write_jsonl(tmp_path / "in.jsonl", ["null", no_custom_id, completion, {**completion, "custom_id": "b"}])
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl", sampling={})
    assert (stats.completed, stats.errors) == (2, 2)
    assert all(set(row) == {"id", "custom_id", "response", "error"} for row in out)  # the bad rows too
    assert "Input read as openai rows, from line 3" in pagedlm_log.text and "--input-format" in pagedlm_log.text
    assert read_input(JobConfig(input=inp, output=""), resolve_input(str(inp)), limit=2)[0] == "plain"  # none of the first 2 decides

    plain = write_jsonl(tmp_path / "plain.jsonl", ['{"note": 1}', {"id": 1, "prompt": "x"},
                                                   {"custom_id": "c", "url": "/v1/completions"}])
    fmt_name, rows = read_input(JobConfig(input=plain, output=""), resolve_input(str(plain)))
    assert fmt_name == "plain" and [where for where, _, _ in rows] == ["line 1", "line 2", "line 3"]


def test_a_first_line_nested_too_deep_is_that_row_s_error(llama_dir, tmp_path):
    deep = '{"id": 1, "prompt": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    inp = write_jsonl(tmp_path / "in.jsonl", [deep, {"id": 2, "prompt": "y"}])
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl")
    assert (stats.completed, stats.errors) == (1, 1)
    assert [r["error"] for r in out if r["error"]][0].startswith("line 1 is not valid JSON")


def test_a_line_that_is_not_utf8_is_its_rows_error_and_runs_once_mended(llama_dir, tmp_path):
    """One line of other bytes is that row's error, without an id (a whole file in another encoding
    is refused up front), so that once the file is saved as UTF-8 a resume runs it; the byte is
    named in the raw line, a byte-order mark included (a review: it was off by the mark)."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "caf\xe9"}\n{"id": 2, "prompt": "x"}\n')
    stats, rows = run(llama_dir, str(inp), tmp_path / "out.jsonl")
    assert (stats.completed, stats.errors) == (1, 1)
    assert [(r["id"], r["error"]) for r in rows if r["error"]] == [
        (None, "line 1 is not UTF-8 (byte 0xe9 at byte 28 of the line): save the file as UTF-8")]
    inp.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "caf\xc3\xa9"}\n{"id": 2, "prompt": "x"}\n')
    stats, rows = run(llama_dir, str(inp), tmp_path / "out.jsonl", resume=True)
    assert (stats.skipped, stats.completed, stats.errors) == (1, 1, 0)


def test_a_corrupt_parquet_row_group_fails_its_rows_and_the_others_run(llama_dir, tmp_path):
    inp = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": i, "prompt": f"Hello {i}"} for i in range(6)]), inp, row_group_size=2)
    page = pq.ParquetFile(inp).metadata.row_group(1).column(0).data_page_offset
    with open(inp, "r+b") as f:  # garble the page header of the second row group's ids
        f.seek(page)
        f.write(b"\xff" * 8)
    out = tmp_path / "out.jsonl"
    stats, rows = run(llama_dir, inp, out)
    assert (stats.rows, stats.completed, stats.errors) == (6, 4, 2)
    assert sorted(r["id"] for r in rows if not r["error"]) == [0, 1, 4, 5]
    errors = sorted(r["error"] for r in rows if r["error"])
    for error, number in zip(errors, (3, 4)):
        assert error.startswith(f"row {number}: row group 2 of 3 of the input cannot be read: OSError: "), error
    assert json.load(open(str(out) + ".summary.json"))["errors"] == 2
    stats, _ = run(llama_dir, inp, out, resume=True)
    assert (stats.skipped, stats.completed) == (6, 0)


def test_a_parquet_value_python_has_no_form_for_fails_its_row_alone(llama_dir, tmp_path):
    """Found by a hunt: a map keyed by structs (TypeError) or a date past 9999 (OverflowError) in a
    carried column ended the job with a traceback before any row, and every --resume the same way."""
    keyed = [None] * 3
    keyed[1] = [({"a": 1}, 2)]
    inp = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"id": [0, 1, 2], "prompt": ["a", "b", "c"],
                             "m": pa.array(keyed, pa.map_(pa.struct([("a", pa.int64())]), pa.int64())),
                             "t": pa.array([0, 0, 2**62], pa.timestamp("us"))}), inp)
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl")
    got = by_id(out)
    assert (stats.completed, stats.errors) == (1, 2) and got[0]["error"] is None
    assert got[1]["error"].startswith("row 2: column(s) 'm' hold a value Python cannot represent (TypeError: unhashable")
    assert got[2]["error"].startswith("row 3: column(s) 't' hold a value Python cannot represent (OverflowError: ")
    assert got[2]["prompt"] == "c"  # the columns that convert are carried, the id among them
    stats, _ = run(llama_dir, inp, tmp_path / "out.jsonl", resume=True)
    assert (stats.skipped, stats.completed, stats.errors) == (3, 0, 0)


def test_parquet_columns_of_arrows_own_extension_types_are_carried_as_they_are(llama_dir, tmp_path):
    """Found by a hunt: a fixed-shape tensor column (pyarrow and HF datasets write one) failed
    every write of a Parquet output, so the job could never finish; a bool8 column became text."""
    import numpy as np

    inp = str(tmp_path / "in.parquet")
    emb = pa.FixedShapeTensorArray.from_numpy_ndarray(np.arange(12, dtype=np.float32).reshape(3, 2, 2))
    flag = pa.ExtensionArray.from_storage(pa.bool8(), pa.array([1, 0, None], pa.int8()))
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": ["a", "b", "c"], "emb": emb, "flag": flag}), inp)
    stats, _ = run(llama_dir, inp, tmp_path / "out.parquet")
    assert (stats.completed, stats.errors) == (3, 0)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.field("emb").type == emb.type and out.schema.field("flag").type == pa.bool8()
    assert out.select(["emb", "flag"]).to_pylist() == [
        {"emb": [0.0, 1.0, 2.0, 3.0], "flag": True}, {"emb": [4.0, 5.0, 6.0, 7.0], "flag": False},
        {"emb": [8.0, 9.0, 10.0, 11.0], "flag": None}]
    # Found by a hunt: inside a list, struct or map they became text.
    import uuid

    tags = pa.array([[uuid.UUID(int=1).bytes], None, []], pa.list_(pa.binary(16))).cast(pa.list_(pa.uuid()))
    meta = pa.array([{"j": "{}", "f": [1, 0]}] * 3, pa.struct([("j", pa.string()), ("f", pa.list_(pa.int8()))]))
    meta = meta.cast(pa.struct([("j", pa.json_()), ("f", pa.list_(pa.bool8()))]))
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": ["a", "b", "c"], "tags": tags, "meta": meta}), inp)
    run(llama_dir, inp, tmp_path / "nested.parquet")
    out = pq.read_table(tmp_path / "nested.parquet")
    assert out.schema.field("tags").type == tags.type and out.schema.field("meta").type == meta.type
    assert sorted(out.select(["id", "tags", "meta"]).to_pylist(), key=lambda r: r["id"]) == [
        {"id": 1, "tags": [uuid.UUID(int=1)], "meta": {"j": "{}", "f": [True, False]}},
        {"id": 2, "tags": None, "meta": {"j": "{}", "f": [True, False]}},
        {"id": 3, "tags": [], "meta": {"j": "{}", "f": [True, False]}}]


def _chat_row(custom_id, **body):
    return _openai_row(custom_id, "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "Hi"}], "chat_template": TEMPLATE, **body})


def _errors(out) -> dict:
    """OpenAI error rows by custom_id: (param, message)."""
    return {r["custom_id"]: (r["response"]["body"]["error"]["param"], r["error"]["message"]) for r in out if r["error"]}


def test_a_key_twice_in_one_object_or_a_huge_integer_is_the_row_s_error(llama_dir, tmp_path):
    """Found by a hunt: json.loads kept the last of a key given twice, so a second "id" renamed the
    row (its first id was never written), a second "prompt" or max_tokens overrode the first, and a
    second "method" turned GET into POST; and an integer beyond 4,300 digits read as invalid JSON with
    advice for Python programmers. Both are the row's error, without an id (a resume runs the row
    once it is mended), in the Ray reader too."""
    from pagedlm.integrations.ray import _parse_line

    lines = ['{"id": "c", "id": "d", "prompt": "a"}',
             '{"id": "e", "prompt": "b", "sampling_params": {"max_tokens": 1, "max_tokens": 3}}',
             '{"id": "f", "prompt": "c", "n": %s}' % ("1" * 5000),
             '{"id": "g", "prompt": "d"}']
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl")
    assert (stats.completed, stats.errors) == (1, 3)
    errors = [r["error"] for r in out if r["id"] is None]
    assert errors == ["line 1: an object holds the key 'id' twice (which one counts is not defined): give it once",
                      "line 2: an object holds the key 'max_tokens' twice (which one counts is not defined): give "
                      "it once", "line 3: an integer of 5000 digits, beyond the 4,300 Python reads"]
    assert [r["id"] for r in out if r["error"] is None] == ["g"]
    assert _parse_line(lines[1])[1].startswith("a line cannot be read: an object holds the key 'max_tokens' twice")


def test_rows_nested_deeper_than_the_limit_are_their_fields_errors(llama_dir, tmp_path):
    """Found by a hunt: a schema or tool definitions nested some hundreds of levels (JSON itself
    takes them) made a RecursionError of the row, naming no field, in the code that drops a
    schema's nulls; every path that reads such a value names its field now."""
    from pagedlm.utils import MAX_JSON_DEPTH

    deep = 1
    for _ in range(MAX_JSON_DEPTH):
        deep = {"a": deep}
    schema = {"type": "object", "properties": {"x": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    plain = [{"id": "schema", "prompt": "a", "sampling_params": {"structured_outputs": {"json": schema}}},
             {"id": "tools", "messages": [{"role": "user", "content": "Hi"}], "tools": [tool]},
             {"id": "fine", "prompt": "b"}]
    _, out = run(llama_dir, write_jsonl(tmp_path / "plain.jsonl", plain), tmp_path / "plain_out.jsonl")
    got = by_id(out)
    assert got["fine"]["error"] is None
    limit = f"nests objects and arrays more than {MAX_JSON_DEPTH} levels deep"
    assert got["schema"]["error"] == f"line 1: sampling_params: structured_outputs.json {limit}; pagedlm takes up to " \
                                     f"{MAX_JSON_DEPTH}"
    assert got["tools"]["error"] == f"line 2: tools {limit}; pagedlm takes up to {MAX_JSON_DEPTH}"
    rows = [_chat_row("format", response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}),
            _chat_row("tools", tools=[tool]), _chat_row("choice", tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"function": deep}),
            _chat_row("fine", max_tokens=2)]
    _, out = run(llama_dir, write_jsonl(tmp_path / "openai.jsonl", rows), tmp_path / "openai_out.jsonl")
    errors = _errors(out)
    assert errors.keys() == {"format", "tools", "choice"}
    assert errors["format"] == ("response_format", f"line 1: response_format.json_schema.schema {limit}; pagedlm "
                                                   f"takes up to {MAX_JSON_DEPTH}")
    assert errors["tools"] == ("tools", f"line 2: body.tools {limit}; pagedlm takes up to {MAX_JSON_DEPTH}")
    assert errors["choice"] == ("tool_choice", f"line 3: body.tool_choice {limit}; pagedlm takes up to {MAX_JSON_DEPTH}")


def test_openai_errors_name_the_body_field_the_row_set(llama_dir, tmp_path):
    """Errors of SamplingParams, the engine's request check and the chat template name the body's
    field (param and text), in JSON's words."""
    rows = [
        # max_num_seqs is 8 (a larger n runs as several requests; best_of picks among all of them)
        _openai_row("n", "/v1/completions", {"prompt": "x", "n": 2, "best_of": 9, "temperature": 1.0}),
        _openai_row("n-greedy", "/v1/completions", {"prompt": "x", "n": 3, "temperature": 0}),
        _openai_row("long-prompt", "/v1/completions", {"prompt": "word " * 200}),
        _chat_row("long-chat", messages=[{"role": "user", "content": "word " * 200}]),
        _chat_row("template-syntax", chat_template="{% for %}"),
        _chat_row("kwargs-messages", chat_template_kwargs={"messages": []}),
        _chat_row("both-prompts", add_generation_prompt=True, continue_final_message=True),
        _openai_row("empty-stop", "/v1/completions", {"prompt": "x", "stop": ""}),
        _chat_row("mct", max_completion_tokens=-1),
        _chat_row("beam", use_beam_search=True, temperature=0),
        _openai_row("schema", "/v1/completions", {"prompt": "x", "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}}),
    ]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", sampling={})
    errors = _errors(out)
    assert stats.errors == len(rows), sorted(set(r["custom_id"] for r in rows) - set(errors))
    assert {k: param for k, (param, _) in errors.items()} == {
        "n": "best_of", "n-greedy": "n", "long-prompt": "prompt", "long-chat": "messages", "template-syntax": "chat_template",
        "kwargs-messages": "chat_template_kwargs", "both-prompts": "continue_final_message", "empty-stop": "stop",
        "mct": "max_completion_tokens", "beam": "use_beam_search", "schema": "response_format"}
    messages = {k: message for k, (_, message) in errors.items()}
    assert "best_of (9) exceeds max_num_seqs (8)" in messages["n"]
    assert "n must be 1 with greedy sampling" in messages["n-greedy"]
    assert "got ''" in messages["empty-stop"] and "['']" not in messages["empty-stop"]
    assert "max_completion_tokens must be null or at least 1" in messages["mct"]
    assert "body.chat_template" in messages["template-syntax"]
    assert "body.chat_template_kwargs" in messages["kwargs-messages"] and "messages" in messages["kwargs-messages"]
    assert "use_beam_search needs" in messages["beam"]
    assert "response_format" in messages["schema"] and "structured_outputs" not in messages["schema"]


def test_plain_row_errors_name_the_field_the_row_set(llama_dir, tmp_path):
    rows = [
        {"id": 1, "prompt": "x", "sampling_params": {"use_beam_search": True, "temperature": 0}},
        {"id": 2, "prompt": "x", "sampling_params": {"n": 2, "best_of": 9, "temperature": 1.0}},
        {"id": 3, "prompt": "x", "sampling_params": {"stop": ""}},
        {"id": 4, "prompt": "x", "sampling_params": {"max_tokens": -1}},
        {"id": 5, "prompt": "x", "sampling_params": {"logprobs": 500}},  # the vocabulary has 384 tokens
        # Found by a hunt: a row's schema was refused by the engine as "structured_outputs.json does not
        # compile", without the row's field; it is checked as the row is read, as OpenAI rows' are.
        {"id": 6, "prompt": "x", "sampling_params": {"structured_outputs": {"json": {"type": "integer", "multipleOf": 3}}}},
        {"id": 7, "prompt": "x", "sampling_params": {"structured_outputs": {"json": "{oops"}}},
    ]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", sampling={})
    errors = {r["id"]: r["error"] for r in out}
    assert stats.errors == 7
    assert "sampling_params: structured_outputs.json: keyword multipleOf: cannot be enforced" in errors[6]
    assert "sampling_params: structured_outputs.json: not JSON text (" in errors[7]
    # A job default's schema is no row's: the engine's error, naming no field of the row (a review).
    rows = [{"id": 1, "prompt": "x"}, {"id": 2, "prompt": "x", "sampling_params": {"max_tokens": 3}}]
    sampling = {"structured_outputs": {"json": {"type": "integer", "multipleOf": 3}}}
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in2.jsonl", rows), tmp_path / "out2.jsonl", sampling=sampling)
    assert stats.errors == 2
    assert all(r["error"].startswith(f"line {r['id']}: structured_outputs.json does not compile: keyword multipleOf")
               for r in out), out
    assert "sampling_params: use_beam_search needs a beam width above 1" in errors[1]
    assert "best_of (9) exceeds max_num_seqs (8)" in errors[2]
    assert "got ''" in errors[3] and "['']" not in errors[3]
    assert "max_tokens must be null or at least 1" in errors[4]
    assert "logprobs (500) exceeds the vocabulary size (384)" in errors[5]


def test_openai_rows_outside_openai_limits_are_refused(llama_dir, tmp_path):
    rows = [
        _openai_row("bias-high", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 100.5}}),
        _openai_row("bias-low", "/v1/completions", {"prompt": "x", "logit_bias": {"5": -101}}),
        _chat_row("tlp-high", logprobs=True, top_logprobs=21),
        _chat_row("tlp-vocab", logprobs=True, top_logprobs=50000),
        _chat_row("tlp-all", logprobs=True, top_logprobs=-1),
        _openai_row("lp-all", "/v1/completions", {"prompt": "x", "logprobs": -1}),
        _chat_row("tlp-neg", logprobs=True, top_logprobs=-2),
        _openai_row("plp-neg", "/v1/completions", {"prompt": "x", "prompt_logprobs": -3}),
        _openai_row("", "/v1/completions", {"prompt": "x"}),
        _openai_row("user", "/v1/completions", {"prompt": "x", "user": 5}),
        _openai_row("ok", "/v1/completions", {"prompt": "x", "max_tokens": 1, "user": "u1", "logprobs": 5,
                                              "logit_bias": {"5": -100}}),
    ]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", sampling={})
    errors = _errors(out)
    assert stats.completed == 1 and "ok" not in errors
    assert {k: param for k, (param, _) in errors.items()} == {
        "bias-high": "logit_bias", "bias-low": "logit_bias", "tlp-high": "top_logprobs", "tlp-vocab": "top_logprobs",
        "tlp-all": "top_logprobs", "lp-all": "logprobs", "tlp-neg": "top_logprobs", "plp-neg": "prompt_logprobs",
        "": "custom_id", "user": "user"}
    assert "[-100, 100]" in errors["bias-high"][1] and "[-100, 100]" in errors["bias-low"][1]
    for k in ("tlp-high", "tlp-all", "lp-all"):  # the job's max_logprobs bounds them, as vLLM's server's
        assert "exceeds max_logprobs (20)" in errors[k][1] and "--max-logprobs" in errors[k][1]
    assert "exceeds the vocabulary size" in errors["tlp-vocab"][1]
    assert all("must be at least 0, or -1" in errors[k][1] for k in ("tlp-neg", "plp-neg"))
    assert "must be a string" in errors["user"][1]


def test_openai_rows_take_as_many_logprobs_as_the_job_allows(llama_dir, tmp_path):
    """Found in session 58: top_logprobs over 20 (and -1, the whole vocabulary, vLLM's) were refused
    even where --max-logprobs allowed them; vLLM's server bounds them by its max_logprobs alone."""
    rows = [_chat_row("top", logprobs=True, top_logprobs=30, max_tokens=2),
            _chat_row("chat_all", logprobs=True, top_logprobs=-1, max_tokens=1),
            _openai_row("all", "/v1/completions", {"prompt": "x", "logprobs": -1, "max_tokens": 1})]
    config = JobConfig(input=write_jsonl(tmp_path / "in.jsonl", rows), output=str(tmp_path / "out.jsonl"),
                       model=llama_dir, engine={**ENGINE, "max_logprobs": -1}, sampling={"temperature": 0.0},
                       trust_request_chat_template=True)
    run_job(config)
    got = {r["custom_id"]: r["response"]["body"] for r in read_output(tmp_path / "out.jsonl")}
    assert [len(p["top_logprobs"]) for p in got["top"]["choices"][0]["logprobs"]["content"]] == [30, 30]
    assert len(got["chat_all"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 384  # the vocabulary
    # keyed by text: the tokens of one text (partial characters' "") share a key
    assert len(got["all"]["choices"][0]["logprobs"]["top_logprobs"][0]) > 200


def test_plain_rows_chat_options_render_their_messages(chat_llama_dir, tmp_path):
    """A plain row's chat_template, chat_template_kwargs, add_generation_prompt, continue_final_message
    and tools render its messages as OpenAI rows' body fields do; on a row without messages they are
    an error, not carried unused."""
    tok = AutoTokenizer.from_pretrained(chat_llama_dir)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    options = [{}, {"add_generation_prompt": False}, {"chat_template_kwargs": {"add_generation_prompt": False}},
               {"add_generation_prompt": False, "continue_final_message": True},
               {"chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ tools[0].name }}",
                "tools": [{"name": "search"}]}]
    rows = [{"id": i, "messages": chat, **option} for i, option in enumerate(options)]
    rows += [{"id": 10, "prompt": "x", "add_generation_prompt": False}, {"id": 11, "prompt": "x", "tools": None}]
    stats, out = run(chat_llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl",
                     sampling={"max_tokens": 1})
    got = by_id(out)
    assert stats.errors == 1 and "add_generation_prompt apply to rows with messages" in got[10]["error"]
    assert got[11]["error"] is None  # null is unset (a Parquet column of other rows' values)
    for i, option in enumerate(options):
        # The row's own fields (and the default add_generation_prompt) win over chat_template_kwargs, as in vLLM.
        kwargs = {**option.get("chat_template_kwargs", {}), "add_generation_prompt": True, **option}
        kwargs.pop("chat_template_kwargs", None)
        want = tok.apply_chat_template(chat, tokenize=True, return_dict=True, **kwargs)["input_ids"]
        assert got[i]["prompt_tokens"] == len(want), option
    assert len({got[i]["prompt_tokens"] for i in range(4)}) == 3  # options 1 and 3 changed the prompt


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback", "wordpiece"])
def test_openai_logprob_bytes_are_each_token_s_own(request, kind):
    """OpenAI's ``bytes``: a token inside a multi-byte character carries its part of it (the text
    it adds in context is "" until the character is whole), and the parts join into the text.
    WordPiece's tokens have no bytes of their own (the output then uses the text a token adds)."""
    fixture = {"byte_level": "tokenizer_dir", "byte_fallback": "sentencepiece_llama_dir",
               "wordpiece": "wordpiece_llama_dir"}[kind]
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    token_bytes = TokenBytes(tok)
    assert token_bytes(tok.eos_token_id) == b"</s>"
    if kind == "wordpiece":
        assert [token_bytes(t) for t in tok("cat dogs", add_special_tokens=False).input_ids] == [None] * 3
        return
    text = "a cat 日本 👍🏽 é"
    ids = tok(text, add_special_tokens=False).input_ids
    parts = [token_bytes(t) for t in ids]
    assert b"".join(parts).decode() == (" " + text if kind == "byte_fallback" else text)  # "▁a" is " a"
    assert sum(1 for part in parts if _is_partial_utf8(part)) >= 3
    if kind == "byte_fallback":
        assert token_bytes(tok.get_vocab()["<0xE6>"]) == b"\xe6"
        # A non-special added token goes through the decoder's "▁" -> " " too (found by a review).
        tok.add_tokens(["▁banana▁split"])
        added = tok.convert_tokens_to_ids("▁banana▁split")
        assert TokenBytes(tok)(added) == b" banana split"  # the decoder strips a first token's leading space only


def _is_partial_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


def test_no_batch_invariant_is_refused_on_cpu_before_any_row_runs(tmp_path, llama_dir, capsys):
    from pagedlm.entrypoints.cli import run_main

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "prompt": "row"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit):
        run_main(["--input", inp, "--output", str(out), "--model", llama_dir, "--device", "cpu",
                  "--no-batch-invariant"])
    assert "--no-batch-invariant: batch_invariant must be None or True on the CPU (False is for CUDA" in capsys.readouterr().err
    assert not out.exists()
    # A user's audit: the error named the Python field, not the flag typed.
    for flags, message in ((["--temperature", "-1"], "--temperature: temperature must be in [0, 2]"),
                           (["--max-tokens", "0"], "--max-tokens: max_tokens must be None or at least 1")):
        with pytest.raises(SystemExit):
            run_main(["--input", inp, "--output", str(out), "--model", llama_dir, *flags])
        assert message in capsys.readouterr().err


def test_openai_bodies_take_vllms_logprob_token_ids(llama_dir, tmp_path):
    """vLLM's server takes logprob_token_ids in a body (chat with logprobs: true): each position's
    top_logprobs are those ids, in their order."""
    ids = [40, 41, 42]
    rows = [_chat_row("chat", logprobs=True, logprob_token_ids=ids),
            # vLLM's server: logprobs switches the ids on, its count unused; an empty list is none.
            _openai_row("cmpl", "/v1/completions", {"prompt": "Hello", "logprobs": 0, "logprob_token_ids": ids}),
            _openai_row("cmpl-empty", "/v1/completions", {"prompt": "Hello", "logprob_token_ids": []}),
            _openai_row("cmpl-no-logprobs", "/v1/completions", {"prompt": "Hello", "logprob_token_ids": ids}),
            _chat_row("no-logprobs", logprob_token_ids=ids),
            _chat_row("both", logprobs=True, top_logprobs=2, logprob_token_ids=ids),
            # vLLM's server takes top_logprobs 0 without logprobs, as clients sending every default do (a hunt).
            _chat_row("zero-top", top_logprobs=0), _chat_row("zero-top-false", logprobs=False, top_logprobs=0),
            _chat_row("one-top", top_logprobs=1)]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = {r["custom_id"]: r for r in out}
    tok = AutoTokenizer.from_pretrained(llama_dir)
    choice = got["chat"]["response"]["body"]["choices"][0]
    for entry in choice["logprobs"]["content"]:  # the sampled token, then the ids (vLLM's whole dict)
        listed = [t["token"] for t in entry["top_logprobs"]]
        assert listed[0] == entry["token"] and [t for t in listed[1:] if t != entry["token"]] == \
            [tok.decode([i]) for i in ids if tok.decode([i]) != entry["token"]]
    for position in got["cmpl"]["response"]["body"]["choices"][0]["logprobs"]["top_logprobs"]:
        assert set(tok.decode([i]) for i in ids) <= set(position) and len(position) <= len(ids) + 1
    assert got["cmpl-empty"]["error"] is None and got["cmpl-empty"]["response"]["body"]["choices"][0]["logprobs"] is None
    assert "logprob_token_ids needs logprobs set" in got["cmpl-no-logprobs"]["error"]["message"]
    assert "logprob_token_ids needs logprobs: true" in got["no-logprobs"]["error"]["message"]
    assert "give one" in got["both"]["error"]["message"]
    assert got["zero-top"]["error"] is None and got["zero-top-false"]["error"] is None
    assert got["zero-top"]["response"]["body"]["choices"][0]["logprobs"] is None
    assert "top_logprobs needs logprobs: true" in got["one-top"]["error"]["message"]


def test_rows_after_a_window_of_bad_rows_still_run(llama_dir, tmp_path):
    """Found by a hunt: with --max-in-flight 1, a refused row with nothing in flight ended the run;
    the rows after it were never written and the job exited 0."""
    rows = [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "word " * 200}, {"id": 3, "prompt": "b"},
            {"id": 4, "prompt_token_ids": []}, {"id": 5, "prompt": "c"}]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", max_in_flight=1)
    assert sorted(r["id"] for r in out) == [1, 2, 3, 4, 5]
    assert sorted(r["id"] for r in out if r["error"]) == [2, 4] and (stats.completed, stats.errors) == (3, 2)


def test_one_row_of_an_unexpected_shape_is_its_own_error(llama_dir, tmp_path):
    """Found by a hunt: a row whose chat_template_kwargs was a string, or an OpenAI row whose url
    was a list, raised out of the row parser and ended the whole job (every --resume again); a
    response_format with keys its type does not take was run with them ignored."""
    chat = [{"role": "user", "content": "hi"}]
    plain = [{"id": 1, "prompt": "ok"}, {"id": 2, "messages": chat, "chat_template_kwargs": "x"}]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "plain.jsonl", plain), tmp_path / "plain.out.jsonl")
    rows = by_id(out)
    assert rows[1]["error"] is None and "chat_template_kwargs must be an object" in rows[2]["error"]
    batch = [_openai_row("a", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
             _openai_row("b", ["/v1/completions"], {"prompt": "x"}),
             _chat_row("c", chat_template_kwargs=["x"]),
             _chat_row("d", response_format={"type": "json_object", "schema": {"type": "object"}}),
             _chat_row("e", response_format={"type": "xml"}),
             # json_schema's own fields, as OpenAI's and vLLM's (a hunt: these were taken and ignored)
             _chat_row("f", response_format={"type": "json_schema", "json_schema": {"name": "x", "nmae": "y",
                                                                                    "schema": {}}}),
             _chat_row("g", response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": "yes",
                                                                                    "schema": {}}}),
             _chat_row("h", response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
             _chat_row("i", response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": None,
                                                                                    "description": "d", "schema": {}}}),
             _openai_row("j", "/v1/chat/completions", {"max_tokens": 2})]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "batch.jsonl", batch), tmp_path / "batch.out.jsonl")
    errors = {key: message for key, (_, message) in _errors(out).items()}
    assert "a" not in errors and "i" not in errors and stats.errors == 8
    assert "body.messages: a conversation must be a list of messages, got null" in errors["j"]  # not "NoneType"
    assert 'response_format.json_schema takes name, description, schema, strict; it has "nmae"' in errors["f"]
    assert 'response_format.json_schema.strict must be true, false or null, got "yes"' in errors["g"]
    assert "response_format.json_schema.name must be a string (required), got null" in errors["h"]
    assert "url must be" in errors["b"] and "chat_template_kwargs must be an object" in errors["c"]
    assert 'response_format of type "json_object" takes no schema' in errors["d"]
    assert 'response_format.type must be one of "text", "json_object", "json_schema", got "xml"' in errors["e"]
    # And a parser that raises anything else still fails only its row.
    from pagedlm.entrypoints.jobs.plain_rows import PlainFormat

    real = PlainFormat.parse

    def parse(self, row, key):
        if key == 2:
            raise KeyError("surprise")
        return real(self, row, key)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PlainFormat, "parse", parse)
        stats, out = run(llama_dir, write_jsonl(tmp_path / "p2.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}]),
                         tmp_path / "p2.out.jsonl")
    rows = by_id(out)
    assert rows[1]["error"] is None and "the row could not be read: KeyError" in rows[2]["error"]


def test_a_row_asking_for_more_logprobs_than_the_job_allows_is_its_error(llama_dir, tmp_path):
    """Found by a hunt: one row's prompt_logprobs=-1 over a long prompt took gigabytes (every
    token's logprobs at every position), enough to end the job for every row. A job allows
    vLLM's max_logprobs, 20, unless --max-logprobs says more."""
    rows = [{"id": 1, "prompt": "The capital of France is", "sampling_params": {"prompt_logprobs": -1}},
            {"id": 2, "prompt": "ok", "sampling_params": {"logprobs": 3}}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    _, out = run(llama_dir, inp, tmp_path / "out.jsonl")
    got = by_id(out)
    assert "exceeds max_logprobs (20)" in got[1]["error"] and got[2]["error"] is None
    config = JobConfig(input=inp, output=str(tmp_path / "all.jsonl"), model=llama_dir,
                       engine={**ENGINE, "max_logprobs": -1}, sampling={"temperature": 0.0, "max_tokens": 2},
                       trust_request_chat_template=True)
    run_job(config)
    assert [r["error"] for r in read_output(tmp_path / "all.jsonl")] == [None, None]


def test_parquet_ids_of_another_type_and_a_damaged_job_record_are_refused_clearly(llama_dir, tmp_path):
    """Found by a hunt: a float64 id column (pandas' integers with a missing value) made every row
    an error with no id, and the job exited 0; an empty OUT.job.json gave --resume only
    "Expecting value: line 1 column 1"."""
    pq.write_table(pa.table({"id": [1.0, 2.0], "prompt": ["a", "b"]}), tmp_path / "f.parquet")
    with pytest.raises(ValueError, match="column 'id' is double; ids must be strings or integers"):
        run(llama_dir, tmp_path / "f.parquet", tmp_path / "f.jsonl")
    assert not os.path.exists(tmp_path / "f.jsonl")
    # OpenAI's custom_id is a string (a hunt: integers made every row an error, and a resume skipped them all)
    pq.write_table(pa.Table.from_pylist([_openai_row(1, "/v1/completions", {"prompt": "a"})]), tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="column 'custom_id' is int64; custom_id must be strings"):
        run(llama_dir, tmp_path / "o.parquet", tmp_path / "o.jsonl")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}])
    run(llama_dir, inp, tmp_path / "out.jsonl")
    for damage in ("", "[]"):
        (tmp_path / "out.jsonl.job.json").write_text(damage)
        with pytest.raises(ValueError, match=r"out.jsonl.job.json \(the job's settings, written when it started\) is damaged"):
            run(llama_dir, inp, tmp_path / "out.jsonl", resume=True)
    # A request-fields column of JSON text, or an integer field of it stored as floats (pandas'
    # integers with a missing value), made every row an error that a resume then skipped (a hunt).
    for name, table, match in [
        ("f1", {"id": [1, 2], "prompt": ["a", "b"], "sampling_params": [{"max_tokens": 2.0}, {"max_tokens": None}]},
         r"sampling_params.max_tokens is double; it must be integers"),
        ("f2", {"id": [1], "prompt": ["a"], "sampling_params": ['{"max_tokens": 2}']},
         r"column 'sampling_params' is string; it must hold objects"),
        ("f4", {"id": [1], "prompt": ["a"], "sampling_params": [{"stop_token_ids": [2.0]}]},
         r"sampling_params.stop_token_ids is list<.*double>; it must be integers"),
        ("f5", {"id": [1], "prompt": ["a"], "sampling_params": [{"prompt_logprob_token_ids": [[2.0]]}]},
         r"sampling_params.prompt_logprob_token_ids is list<.*list<.*double>>; it must be integers"),
        # the same of a prompt or chat column (a hunt: a conversation as JSON text, token ids as floats)
        ("p1", {"id": [1], "messages": ['[{"role": "user", "content": "a"}]']},
         r"column 'messages' is string; it must hold lists, or be null"),
        ("p2", {"id": [1, 2], "prompt_token_ids": [[3.0, 4.0], None]}, r"column 'prompt_token_ids' is list<.*double>; "
                                                                     "it must hold lists of integers"),
        ("p3", {"id": [1], "prompt": [5]}, r"column 'prompt' is int64; it must hold strings"),
        ("p4", {"id": [1], "prompt": [b"a"]}, r"column 'prompt' is binary; it must hold strings"),
        ("p5", {"id": [1], "messages": [[{"role": "user", "content": "a"}]], "add_generation_prompt": [1]},
         r"column 'add_generation_prompt' is int64; it must hold booleans"),
    ]:
        pq.write_table(pa.table(table), tmp_path / f"{name}.parquet")
        with pytest.raises(ValueError, match=match):
            run(llama_dir, tmp_path / f"{name}.parquet", tmp_path / f"{name}.jsonl")
    batch = [_openai_row("a", "/v1/completions", {"prompt": "a", "max_tokens": 2.0}),
             _openai_row("b", "/v1/completions", {"prompt": "b", "max_tokens": None})]
    pq.write_table(pa.Table.from_pylist(batch), tmp_path / "f3.parquet")
    with pytest.raises(ValueError, match=r"body.max_tokens is double; it must be integers"):
        run(llama_dir, tmp_path / "f3.parquet", tmp_path / "f3.jsonl")
    # A column twice (a hunt: a KeyError for the id, another column silently dropped or the merge failed)
    twice = pa.Table.from_arrays([pa.array([1]), pa.array(["a"]), pa.array(["b"])], names=["id", "prompt", "prompt"])
    pq.write_table(twice, tmp_path / "twice.parquet")
    with pytest.raises(ValueError, match=r"column\(s\) 'prompt' appear more than once"):
        run(llama_dir, tmp_path / "twice.parquet", tmp_path / "twice.jsonl")
    nulls = pa.table({"id": [1], "prompt": ["a"], "messages": pa.nulls(1), "prompt_token_ids": pa.nulls(1)})
    pq.write_table(nulls, tmp_path / "nulls.parquet")  # a null column of another prompt kind passes
    _, out = run(llama_dir, tmp_path / "nulls.parquet", tmp_path / "nulls.jsonl")
    assert out[0]["error"] is None
    # string_view (pyarrow's, Polars') is a string type (a hunt: refused as "not strings").
    ids = pa.array(["a", "b"]).cast(pa.string_view())
    pq.write_table(pa.table({"id": ids, "prompt": ["x", "y"]}), tmp_path / "v.parquet")
    _, out = run(llama_dir, tmp_path / "v.parquet", tmp_path / "v.jsonl")
    assert [(r["id"], r["error"]) for r in out] == [("a", None), ("b", None)]


def test_parquet_rows_of_different_json_schemas_each_keep_their_own(llama_dir, tmp_path):
    """Found by a hunt: Arrow gave each row's schema the other rows' properties as nulls, and
    every row failed ("Schema should be an object or bool, but got null")."""
    schemas = [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}]
    bodies = [{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24,
               "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}}
              for i, schema in enumerate(schemas)]
    table = pa.table({"custom_id": ["a", "b"], "method": ["POST"] * 2, "url": ["/v1/chat/completions"] * 2,
                      "body": bodies})
    pq.write_table(table, tmp_path / "in.parquet")
    config = JobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out.jsonl"), model=llama_dir,
                       engine={**ENGINE, "chat_template": TEMPLATE}, sampling={"temperature": 0.0},
                       trust_request_chat_template=True)
    run_job(config)
    out = read_output(tmp_path / "out.jsonl")
    assert [row["error"] for row in out] == [None, None]
    texts = {row["custom_id"]: row["response"]["body"]["choices"][0]["message"]["content"] for row in out}
    # Each row under its own schema: its one required key comes first (the rest may be cut by max_tokens).
    assert texts["a"].startswith("{") and texts["a"][1:].lstrip().startswith('"a"')
    assert texts["b"].startswith("{") and texts["b"][1:].lstrip().startswith('"b"')


def test_a_line_holding_only_a_byte_order_mark_is_no_row(llama_dir, tmp_path):
    """Found by a hunt: it became an extra error row with no id."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf\n" + json.dumps({"id": 1, "prompt": "a"}).encode() + b"\n\xef\xbb\xbf \r\n")
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl")
    assert [row["id"] for row in out] == [1] and (stats.rows, stats.errors) == (1, 0)


def test_a_row_field_that_clashes_with_a_job_default_is_the_rows_param():
    """Found by a review: once SamplingParams' errors named their field, a check between two fields
    named the one the job set, and the row's own field was no longer the error's param."""
    from pagedlm.entrypoints.jobs.rows import field_error
    from pagedlm.utils import FieldError

    names = {"use_beam_search": "use_beam_search", "n": "n"}  # the fields the row set
    error = field_error(FieldError("temperature must be 0 with use_beam_search.", "temperature"), names)
    assert error.param == "use_beam_search"


def test_an_engine_error_names_a_renamed_field_without_its_engine_keys():
    """Found by session 43: "structured_outputs.json admits no output" reached a tools row as
    "tools.json admits ..." (the row has no tools.json)."""
    from pagedlm.entrypoints.jobs.rows import field_error
    from pagedlm.utils import FieldError

    names = {"structured_outputs": "response_format", "max_tokens": "max_tokens", "prompt": "messages"}
    error = field_error(ValueError("structured_outputs.json admits no output at all"), names)
    assert (str(error), error.param) == ("response_format admits no output at all", "response_format")
    error = field_error(ValueError("max_tokens.x must be at least 1"), names)  # a field's own name stays whole
    assert str(error) == "max_tokens.x must be at least 1"
    # Found by a docs hunt: the flag in the message became "--max-top_logprobs".
    message = "logprobs (10) exceeds max_logprobs (5), the LLM's limit (LLM(max_logprobs=...); pagedlm run: --max-logprobs)"
    error = field_error(FieldError(message, "logprobs"), {"logprobs": "top_logprobs"})
    assert str(error) == message.replace("logprobs (10)", "top_logprobs (10)") and error.param == "top_logprobs"


@pytest.mark.parametrize("url", ["/v1/chat/completions", "/v1/completions"])
def test_openai_echo_takes_true_or_false(llama_dir, url):
    """Found by a docs walk: chat rows refused echo: false, which the docs (and vLLM) take. (What
    echo does: ``test_openai_completions_echo_the_prompt_...``, ``test_openai_chat_echo_...``.)"""
    from pagedlm.entrypoints.jobs.openai_batch import OpenAIBatchFormat
    from pagedlm.entrypoints.jobs.rows import RowError

    fmt = OpenAIBatchFormat(AutoTokenizer.from_pretrained(llama_dir), ["tiny"], {}, trust_request_chat_template=True)
    prompt = {"messages": [{"role": "user", "content": "Hi"}], "chat_template": TEMPLATE} if "chat" in url else \
        {"prompt": "Hi"}
    for echo in (False, True):
        assert fmt.parse(_openai_row("a", url, {**prompt, "echo": echo}), "a").prompt
    with pytest.raises(RowError, match="echo must be true or false") as exc:
        fmt.parse(_openai_row("b", url, {**prompt, "echo": "yes"}), "b")
    assert exc.value.param == "echo"


def test_the_structured_outputs_config_flag_takes_a_json_object(capsys):
    """The engine's refusal of a constraint under a reasoning parser points to enable_in_reasoning,
    which a job on the command line could not set (found by a docs walk)."""
    from pagedlm.entrypoints.cli import run_parser

    base = ["--input", "in.jsonl", "--output", "out.jsonl"]
    args = run_parser().parse_args(base + ["--structured-outputs-config", '{"enable_in_reasoning": true}'])
    assert args.structured_outputs_config == {"enable_in_reasoning": True}
    for bad, message in (("{enable", "not JSON"), ("[1]", "must be a JSON object")):
        with pytest.raises(SystemExit):
            run_parser().parse_args(base + ["--structured-outputs-config", bad])
        assert message in capsys.readouterr().err


def test_a_row_the_engine_refuses_after_its_checks_is_that_rows_error(llama_dir, tmp_path, monkeypatch):
    """Found by a hunt: a bad word holding a lone surrogate (a JSON escape) passed the checks and made
    the tokenizer raise in the engine's add_request, which ended the job, lost the rows in flight,
    and did so again on every resume. Such a word is refused with the row's params now; and any
    error of add_request is that row's, its requests leaving the engine."""
    from pagedlm.engine.llm_engine import LLMEngine

    rows = [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b", "sampling_params": {"bad_words": ["ok\udc80"]}},
            {"id": 3, "prompt": "boom", "sampling_params": {"n": 12, "temperature": 1.0}},  # child requests
            {"id": 4, "prompt": "c", "sampling_params": {"n": 12, "temperature": 1.0, "seed": 1}}]
    add = LLMEngine.add_request

    def add_request(self, request_id, prompt, params, *args, **kwargs):
        if prompt.text == "boom" and request_id.endswith(".1"):  # its first child request is in: taken out again
            raise TypeError("the tokenizer's bad day")
        return add(self, request_id, prompt, params, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", add_request)
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl",
                     sampling={"temperature": 0.0, "max_tokens": 3})
    got = by_id(out)
    assert (stats.completed, stats.errors) == (2, 2) and got[1]["error"] is None and len(got[4]["outputs"]) == 12
    assert "bad_words must be text the tokenizer can encode" in got[2]["error"]
    assert "TypeError: the tokenizer's bad day" in got[3]["error"]


def test_openai_usage_counts_the_prompt_tokens_read_from_the_prefix_cache(llama_dir, tmp_path):
    """OpenAI's usage.prompt_tokens_details.cached_tokens (vLLM's server writes it with
    --enable-prompt-tokens-details): the prompt tokens a row read from the prefix cache."""
    prompt = [1] + list(range(40, 80))
    rows = [_openai_row(name, "/v1/completions", {"prompt": prompt, "max_tokens": 2}) for name in ("first", "again")]
    chat = {"messages": [{"role": "user", "content": "a cat and a banana " * 6}], "max_tokens": 2,
            "chat_template": TEMPLATE}
    rows.append(_openai_row("chat", "/v1/chat/completions", chat))
    _, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", max_in_flight=1)
    usage = {r["custom_id"]: r["response"]["body"]["usage"] for r in out}
    # vLLM's chat endpoint also writes the prompt tokens its prefill wrote into the cache (a hunt: missing)
    details = usage["chat"]["prompt_tokens_details"]
    assert set(details) == {"cached_tokens", "created_cache_tokens", "multimodal_tokens"}
    assert 16 <= details["created_cache_tokens"] <= usage["chat"]["prompt_tokens"] and details["multimodal_tokens"] is None
    assert usage["first"]["prompt_tokens_details"] == {"cached_tokens": 0, "created_cache_tokens": None,
                                                       "multimodal_tokens": None}
    assert 32 <= usage["again"]["prompt_tokens_details"]["cached_tokens"] < len(prompt) == usage["again"]["prompt_tokens"]


def test_openai_bodies_take_vllms_structured_outputs(llama_dir, tmp_path):
    """vLLM's server's structured_outputs body field (a hunt: refused, leaving OpenAI rows no regex,
    choice or grammar): its constraint holds, a response_format takes its options (a constraint in both is refused),
    and with a tool call forced it is refused, as vLLM's server refuses it."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    rows = [_openai_row("choice", "/v1/completions", {"prompt": "Hello", "max_tokens": 5, "temperature": 1.0, "seed": 2,
                                                      "structured_outputs": {"choice": ["yes", "no"]}}),
            _chat_row("regex", max_tokens=8, temperature=1.0, seed=3, structured_outputs={"regex": "[a-c]{3}"}),
            _openai_row("compact", "/v1/completions", {
                "prompt": "Hello", "max_tokens": 40, "temperature": 1.0, "seed": 4,
                "structured_outputs": {"disable_any_whitespace": True},
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}}),
            _chat_row("two", structured_outputs={"regex": "a"}, response_format={"type": "json_object"}),
            _chat_row("tools", structured_outputs={"regex": "a"}, tools=[tool], tool_choice="required"),
            _chat_row("not-object", structured_outputs="a")]
    stats, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", sampling={})
    got = by_id(out, "custom_id")
    assert (stats.completed, stats.errors) == (3, 3)
    assert got["choice"]["response"]["body"]["choices"][0]["text"] in ("yes", "no")
    assert re.fullmatch("[a-c]{3}", got["regex"]["response"]["body"]["choices"][0]["message"]["content"])
    compact = got["compact"]["response"]["body"]["choices"][0]  # this seed's output ends within max_tokens
    assert compact["finish_reason"] == "stop" and compact["text"].startswith('{"a":')
    assert isinstance(json.loads(compact["text"])["a"], int)
    # both constrain (vLLM's fails too): said by name (a docs walk: "got json, regex" named a json no field gave)
    assert "body.response_format and body.structured_outputs (regex) both constrain the output" in \
        got["two"]["error"]["message"] and got["two"]["response"]["body"]["error"]["param"] == "response_format"
    assert "body.structured_outputs and body.tool_choice both constrain the output" in got["tools"]["error"]["message"]
    assert "body.structured_outputs must be an object" in got["not-object"]["error"]["message"]


def test_openai_bodies_take_vllms_return_token_ids(llama_dir, tmp_path):
    """vLLM's return_token_ids: chat's prompt token ids in the body and each choice's own; a
    completion's both in each choice (vLLM's server's places)."""
    rows = [_chat_row("chat", max_tokens=3, return_token_ids=True),
            _openai_row("cmpl", "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "n": 2, "temperature": 1.0,
                                                    "seed": 1, "return_token_ids": True}),
            _chat_row("off", max_tokens=3, return_token_ids=False), _chat_row("bad", return_token_ids=1)]
    _, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = by_id(out, "custom_id")
    chat, cmpl = got["chat"]["response"]["body"], got["cmpl"]["response"]["body"]
    tok = AutoTokenizer.from_pretrained(llama_dir)
    assert len(chat["prompt_token_ids"]) == chat["usage"]["prompt_tokens"]
    assert tok.decode(chat["choices"][0]["token_ids"]) == chat["choices"][0]["message"]["content"]
    assert [c["prompt_token_ids"] for c in cmpl["choices"]] == [tok("Hello").input_ids] * 2
    assert all(tok.decode(c["token_ids"]) == c["text"] for c in cmpl["choices"])
    off = got["off"]["response"]["body"]
    assert off["prompt_token_ids"] is None and off["choices"][0]["token_ids"] is None
    assert "body.return_token_ids must be true or false" in got["bad"]["error"]["message"]


def test_openai_bodies_hold_vllms_keys_as_null_where_unset(llama_dir, tmp_path):
    """A 200 body has the keys vLLM's run-batch writes (its pydantic models dumped whole), null
    where the request set nothing: a reader written against vLLM's output finds every key."""
    rows = [_chat_row("chat", max_tokens=2), _openai_row("cmpl", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})]
    _, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = by_id(out, "custom_id")
    chat, cmpl = got["chat"]["response"]["body"], got["cmpl"]["response"]["body"]
    top = {"id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage"}
    assert chat.keys() == top | {"prompt_logprobs", "prompt_token_ids"} and cmpl.keys() == top
    assert chat["choices"][0].keys() == {"index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids"}
    assert chat["choices"][0]["message"].keys() == {"role", "content", "refusal", "annotations", "audio",
                                                    "function_call", "reasoning"}
    assert cmpl["choices"][0].keys() == {"index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                                         "prompt_logprobs", "prompt_token_ids"}
    assert chat["usage"].keys() == cmpl["usage"].keys() == {"prompt_tokens", "completion_tokens", "total_tokens",
                                                            "prompt_tokens_details", "completion_tokens_details"}
    unset = [chat["service_tier"], chat["prompt_logprobs"], chat["prompt_token_ids"], chat["choices"][0]["token_ids"],
             *(chat["choices"][0]["message"][k] for k in ("refusal", "annotations", "audio", "function_call", "reasoning")),
             cmpl["choices"][0]["token_ids"], cmpl["choices"][0]["prompt_logprobs"],
             cmpl["choices"][0]["prompt_token_ids"], chat["usage"]["completion_tokens_details"]]
    assert unset == [None] * len(unset)
    assert isinstance(chat["choices"][0]["message"]["content"], str)


def test_openai_bodies_take_vllms_prompt_logprobs(llama_dir, tmp_path):
    """vLLM's prompt_logprobs: per prompt token (null for the first) its id -> logprob, rank and
    decoded_token, the prompt's own token and the top ones; chat's in the body, a completion's in
    each choice (vLLM's server's places); the job's max_logprobs bounds it."""
    ids = [1] + list(range(40, 52))
    rows = [_openai_row("cmpl", "/v1/completions", {"prompt": ids, "max_tokens": 2, "prompt_logprobs": 2}),
            _chat_row("chat", max_tokens=2, prompt_logprobs=0), _chat_row("all", prompt_logprobs=-1)]
    _, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = by_id(out, "custom_id")
    with LLM(llama_dir, **ENGINE) as llm:
        want = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=2))[0].prompt_logprobs
    written = got["cmpl"]["response"]["body"]["choices"][0]["prompt_logprobs"]
    assert written[0] is None and len(written) == len(ids)
    for position, expected in zip(written[1:], want[1:]):
        assert {int(t): (v["logprob"], v["rank"], v["decoded_token"]) for t, v in position.items()} == {
            t: (lp.logprob, lp.rank, lp.decoded_token) for t, lp in expected.items()}
    chat = got["chat"]["response"]["body"]
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and "prompt_logprobs" not in chat["choices"][0]
    assert all(len(p) == 1 for p in chat["prompt_logprobs"][1:])  # the prompt's own token alone
    assert "exceeds max_logprobs (20)" in got["all"]["error"]["message"]


def test_openai_completions_echo_the_prompt_as_vllms_server_does(llama_dir, tmp_path):
    """Completions' echo (lm-evaluation-harness scores prompts so: echo, logprobs, max_tokens 0):
    the prompt's text before the output, and with logprobs the prompt's (null at its first token),
    then the output's; max_tokens 0 returns the prompt alone (vLLM's server runs one token)."""
    prompt = "The capital of France is"
    body = {"prompt": prompt, "temperature": 0}
    rows = [_openai_row("score", "/v1/completions", {**body, "echo": True, "max_tokens": 0, "logprobs": 1}),
            _openai_row("both", "/v1/completions", {**body, "echo": True, "max_tokens": 3, "logprobs": 0}),
            _openai_row("plain", "/v1/completions", {**body, "max_tokens": 3, "logprobs": 0})]
    _, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = {r["custom_id"]: r for r in out}
    with LLM(llama_dir, **ENGINE) as llm:
        want = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    score = got["score"]["response"]["body"]["choices"][0]
    ids = want.prompt_token_ids
    assert score["text"] == prompt and score["finish_reason"] == "length"
    assert score["logprobs"]["token_logprobs"][0] is None and score["logprobs"]["top_logprobs"][0] is None
    assert score["logprobs"]["token_logprobs"][1:] == [want.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i]
    assert len(score["logprobs"]["tokens"]) == len(ids) and "".join(score["logprobs"]["tokens"]).endswith(prompt)
    assert got["score"]["response"]["body"]["usage"]["completion_tokens"] == 1  # generated, not returned (vLLM's)
    both, plain = (got[k]["response"]["body"]["choices"][0] for k in ("both", "plain"))
    assert both["text"] == prompt + plain["text"]
    assert both["logprobs"]["token_logprobs"][len(ids):] == plain["logprobs"]["token_logprobs"]


def test_openai_chat_echo_puts_the_last_message_first_as_vllms_server_does(llama_dir, tmp_path):
    """Chat's echo (vLLM's server's): the last message's content goes before each choice's when it
    is the response's role: "assistant", or the last message's own role without a generation
    prompt (vLLM's role then; a prefill continued with continue_final_message is the use); with
    top_logprobs the prompt's logprobs come too (vLLM asks for them)."""
    prefill = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Well,"},
                                                                                   {"type": "text", "text": "so"}]}]
    cont = {"messages": prefill, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 4,
            "n": 2, "temperature": 1.0, "seed": 3}
    rows = [_chat_row("echo", **cont, echo=True), _chat_row("plain", **cont),
            _chat_row("user", echo=True, max_tokens=3), _chat_row("user_plain", max_tokens=3),
            _chat_row("user_role", echo=True, max_tokens=3, add_generation_prompt=False),
            _chat_row("scored", echo=True, max_tokens=2, logprobs=True, top_logprobs=1),
            # Found by a hunt: vLLM's top_logprobs defaults to 0, so echo alone returns them too.
            _chat_row("echo_only", echo=True, max_tokens=2)]
    _, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = {r["custom_id"]: r["response"]["body"] for r in out}
    messages = {k: [c["message"] for c in body["choices"]] for k, body in got.items()}
    assert len(messages["echo"]) == 2 and messages["echo"] == [
        {**m, "content": "Well,\nso" + m["content"]} for m in messages["plain"]]  # parts joined as the template saw them
    assert messages["user"] == messages["user_plain"] and messages["user"][0]["role"] == "assistant"
    user_role = messages["user_role"][0]
    assert user_role["role"] == "user" and user_role["content"].startswith("Hi")
    scored = got["scored"]
    assert scored["prompt_logprobs"][0] is None and len(scored["prompt_logprobs"]) == scored["usage"]["prompt_tokens"]
    assert all(1 <= len(p) <= 2 for p in scored["prompt_logprobs"][1:])
    echo_only = got["echo_only"]["prompt_logprobs"]
    assert echo_only[0] is None and len(echo_only) == got["echo_only"]["usage"]["prompt_tokens"]
    assert all(len(p) == 1 for p in echo_only[1:])  # the prompt's own token only
    assert got["user_plain"]["prompt_logprobs"] is None  # no echo: none


def test_openai_bodies_take_vllms_add_special_tokens_request_id_and_priority(llama_dir, tmp_path):
    """vLLM's add_special_tokens: the tokenizer's BOS on top of a chat template's (off by default for
    chat, on for completions, whose text prompt then goes without it); request_id names the
    response ("chatcmpl-" or "cmpl-" and it); priority takes 0 (first come, first served)."""
    no_bos = TEMPLATE.removeprefix("{{ bos_token }}")
    chat = {"chat_template": no_bos, "max_tokens": 2, "return_token_ids": True}
    cmpl = {"prompt": "Hello", "max_tokens": 2, "return_token_ids": True}
    rows = [_chat_row("chat", **chat), _chat_row("chat_bos", **chat, add_special_tokens=True, request_id="r1"),
            _openai_row("cmpl", "/v1/completions", cmpl),
            _openai_row("cmpl_plain", "/v1/completions", {**cmpl, "add_special_tokens": False, "request_id": "r2",
                                                         "priority": 0}),
            _openai_row("ids", "/v1/completions", {**cmpl, "prompt": [5, 6], "add_special_tokens": False}),
            _chat_row("bad", add_special_tokens="yes"), _chat_row("urgent", priority=1),
            _chat_row("flag", priority=True), _chat_row("rid", request_id=7),
            # Found by a hunt: the tokenizer's TypeError, naming no field (the same text with the
            # tokenizer's special tokens was the prompt's error).
            _openai_row("surrogate", "/v1/completions", {**cmpl, "prompt": "He\ud800llo", "add_special_tokens": False})]
    _, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = {r["custom_id"]: r["response"]["body"] for r in out}
    tok = AutoTokenizer.from_pretrained(llama_dir)
    plain = got["chat"]["prompt_token_ids"]
    assert plain[0] != BOS and got["chat_bos"]["prompt_token_ids"] == [BOS, *plain]
    assert got["chat_bos"]["id"] == "chatcmpl-r1" and got["cmpl_plain"]["id"] == "cmpl-r2"
    assert got["cmpl"]["id"].startswith("cmpl-") and got["cmpl"]["id"] != got["cmpl_plain"]["id"]
    assert got["cmpl"]["choices"][0]["prompt_token_ids"] == tok("Hello").input_ids
    assert got["cmpl_plain"]["choices"][0]["prompt_token_ids"] == tok("Hello", add_special_tokens=False).input_ids
    assert got["ids"]["choices"][0]["prompt_token_ids"] == [5, 6]
    errors = {k: (v["error"]["param"], v["error"]["message"]) for k, v in got.items() if "error" in v}
    assert errors.keys() == {"bad", "urgent", "flag", "rid", "surrogate"}
    assert errors["surrogate"] == ("prompt", "line 10: prompt: the text is not valid Unicode (surrogates not allowed "
                                             "at character 2)")
    assert errors["bad"][0] == "add_special_tokens" and "must be true or false" in errors["bad"][1]
    assert errors["urgent"][0] == errors["flag"][0] == "priority" and "must be 0" in errors["urgent"][1]
    assert errors["rid"] == ("request_id", "line 9: body.request_id must be a string, got 7")


def test_openai_bodies_take_vllms_return_tokens_as_token_ids(llama_dir, tmp_path):
    """vLLM's return_tokens_as_token_ids: every token of the logprobs (sampled, top, echoed prompt)
    as "token_id:<id>", the top ones' bytes the placeholder's and the sampled token's its own
    (vLLM's server's; found by a hunt: the placeholder's too); with return_token_ids an echoed
    completion's text leaves the prompt out, whose ids it holds (vLLM's; found by the same hunt)."""
    rows = [_chat_row("chat", max_tokens=3, logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True),
            _openai_row("cmpl", "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "logprobs": 1, "echo": True,
                                                    "return_tokens_as_token_ids": True, "return_token_ids": True})]
    _, out = run(llama_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
    got = {r["custom_id"]: r["response"]["body"] for r in out}
    chat = got["chat"]["choices"][0]
    from pagedlm.transformers_utils.tokenizer import TokenBytes

    tok = AutoTokenizer.from_pretrained(llama_dir)
    own = TokenBytes(tok)
    for entry in chat["logprobs"]["content"]:
        token_id = int(entry["token"].removeprefix("token_id:"))
        assert entry["token"] == f"token_id:{token_id}" and bytes(entry["bytes"]) == own(token_id)
        assert all(re.fullmatch(r"token_id:\d+", t["token"]) and bytes(t["bytes"]).decode() == t["token"]
                   for t in entry["top_logprobs"])
    cmpl = got["cmpl"]["choices"][0]
    assert cmpl["logprobs"]["tokens"] == [f"token_id:{t}" for t in cmpl["prompt_token_ids"] + cmpl["token_ids"]]
    assert all(re.fullmatch(r"token_id:\d+", t) for top in cmpl["logprobs"]["top_logprobs"][1:] for t in top)
    assert cmpl["text"] == tok.decode(cmpl["token_ids"])  # no prompt text: return_token_ids holds it


def test_parquet_values_json_lacks_become_text_in_a_jsonl_output(llama_dir, tmp_path):
    """Parquet to JSONL: dates, bytes (base64) and NaN (null) as docs/jobs.md says, map keys too
    (found by a hunt: a map<binary, string> column's row lost its result to "keys must be str")."""
    table = pa.table({
        "id": [1], "prompt": ["x"], "when": [datetime.date(2026, 12, 7)], "raw": [b"\x00\xff"], "score": [float("nan")],
        "mb": pa.array([[(b"k", "v")]], pa.map_(pa.binary(), pa.string())),
        "md": pa.array([[(datetime.date(2026, 1, 2), 1)]], pa.map_(pa.date32(), pa.int64())),
    })
    pq.write_table(table, tmp_path / "in.parquet")
    stats, out = run(llama_dir, tmp_path / "in.parquet", tmp_path / "out.jsonl")
    assert (stats.completed, stats.errors) == (1, 0), out
    row = out[0]
    assert (row["when"], row["raw"], row["score"], row["error"]) == ("2026-12-07", "AP8=", None, None)
    assert (row["mb"], row["md"]) == ({"aw==": "v"}, {"2026-01-02": 1})


def test_list_view_columns_are_lists(llama_dir, tmp_path):
    """Found by a hunt: list_view prompt_token_ids (pyarrow 16's, as string_view is taken) were refused."""
    ids = pa.ListViewArray.from_arrays(pa.array([0], pa.int32()), pa.array([3], pa.int32()), pa.array([1, 5, 6]))
    pq.write_table(pa.table({"id": [1], "prompt_token_ids": ids}), tmp_path / "in.parquet")
    stats, out = run(llama_dir, tmp_path / "in.parquet", tmp_path / "out.jsonl")
    assert stats.completed == 1 and out[0]["error"] is None and len(out[0]["outputs"][0]["token_ids"]) == 6


def test_a_directory_of_shards_is_one_input(llama_dir, tmp_path):
    """A dataset's shards (and a --ray job's output) are a directory of files: read in name order as
    one input, hidden files left out, a Parquet output's columns the shards' joined; a row's error
    names its file; resume skips the rows of every shard; an output inside the directory, a
    directory of both kinds or of neither are refused."""
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"], "x": pa.array([1, 2], pa.int32())}),
                   shards / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"id": [3], "prompt": pa.array(["c"]).dictionary_encode(), "x": pa.array([3], pa.int64()),
                             "y": ["extra"]}), shards / "train-00001-of-00002.parquet")  # a categorical prompt too
    (shards / "_SUCCESS").write_text("")
    stats, out = run(llama_dir, shards, tmp_path / "out.parquet")
    assert (stats.rows, stats.completed) == (3, 3)
    assert [(r["id"], r["x"], r["y"]) for r in out] == [(1, 1, None), (2, 2, None), (3, 3, "extra")]
    assert pq.read_schema(tmp_path / "out.parquet").field("x").type == pa.int64()
    # Found by a hunt: types no type holds together (int64 and string, string and string_view) were
    # refused once the model had loaded, leaving the job's record; the column is text, as the docs say.
    pq.write_table(pa.table({"id": ["4"], "prompt": pa.array(["d"], pa.string_view()), "x": ["four"]}),
                   shards / "train-00002-of-00002.parquet")
    stats, out = run(llama_dir, shards, tmp_path / "mixed.parquet")
    assert sorted((r["id"], r["x"]) for r in out) == [("1", "1"), ("2", "2"), ("3", "3"), ("4", "four")]
    assert stats.completed == 4 and pq.read_schema(tmp_path / "mixed.parquet").field("x").type == pa.string()
    (shards / "train-00002-of-00002.parquet").unlink()

    lines = tmp_path / "lines"
    lines.mkdir()
    (lines / "b.jsonl").write_text('{"id": 3, "prompt": "c"}\nnot json\n')
    (lines / "a.jsonl").write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n')
    (lines / ".hidden.jsonl").write_text("garbage\n")
    stats, out = run(llama_dir, lines, tmp_path / "out.jsonl")
    assert [r["id"] for r in out if r["error"] is None] == [1, 2, 3]
    assert [r["error"][:36] for r in out if r["error"]] == ["b.jsonl: line 2 is not valid JSON: E"]
    (lines / "c.jsonl").write_text('{"id": 4, "prompt": "d"}\n')
    stats, out = run(llama_dir, lines, tmp_path / "out.jsonl", resume=True)
    assert (stats.skipped, stats.completed) == (4, 1) and out[-1]["id"] == 4

    with pytest.raises(ValueError, match="is in the --input directory"):
        run(llama_dir, lines, lines / "out.jsonl")
    (tmp_path / "link").symlink_to(lines)
    with pytest.raises(ValueError, match="is in the --input directory"):  # found by a review: through a symlink
        run(llama_dir, tmp_path / "link", lines / "out.jsonl")
    (lines / "e.JSONL").write_text('{"id": 5, "prompt": "e"}\n')  # found by a review: left out
    stats, out = run(llama_dir, lines, tmp_path / "out.jsonl", resume=True)
    assert (stats.skipped, stats.completed) == (5, 1) and out[-1]["id"] == 5
    (lines / "d.parquet").write_bytes((shards / "train-00000-of-00002.parquet").read_bytes())
    with pytest.raises(ValueError, match="holds JSONL and Parquet files"):
        run(llama_dir, lines, tmp_path / "other.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a directory without files ending in one of"):
        run(llama_dir, tmp_path / "empty", tmp_path / "other.jsonl")


def test_a_directory_input_is_listed_once(llama_dir, tmp_path, monkeypatch):
    """Found by a review: every check and the read listed the directory again, so a shard a
    producer added during the run was read without the checks (and an object store's prefix was
    listed seven times). The run reads the files its first listing found."""
    lines = tmp_path / "lines"
    lines.mkdir()
    (lines / "a.jsonl").write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n')
    listings, list_files = [], storage.list_files

    def list_then_add_a_shard(directory, suffixes):
        listings.append(directory)
        found = list_files(directory, suffixes)
        (lines / "b.jsonl").write_text('{"id": 3, "prompt": "c"}\n')
        return found

    monkeypatch.setattr(storage, "list_files", list_then_add_a_shard)
    stats, out = run(llama_dir, lines, tmp_path / "out.jsonl")
    assert (stats.rows, [r["id"] for r in out], listings) == (2, [1, 2], [str(lines)])
    assert resolve_input(str(lines)).files == (str(lines / "a.jsonl"), str(lines / "b.jsonl"))


def test_an_openai_row_whose_completion_was_aborted_is_an_error(llama_dir, tmp_path):
    """Found by a hunt: a constrained row with no token left to sample (its grammar's only first
    token banned) was a 200 response with finish_reason "abort", which OpenAI's responses have no
    value for (its SDK refuses the body); vLLM's server answers it with an error. Plain rows keep
    the engine's "abort"."""
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["x"]}}}
    rows = [_chat_row("aborted", response_format=schema, bad_words=['"']), _chat_row("fine", max_tokens=2)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stats, out = run(llama_dir, inp, tmp_path / "out.jsonl")
    assert (stats.completed, stats.errors) == (1, 1)
    assert _errors(out)["aborted"][1].startswith("line 1: no token was left to sample for the completion")
    usage = next(r["response"]["body"]["usage"] for r in out if r["custom_id"] == "fine")
    # The summary's tokens are the completed rows' (a hunt: the error row's were counted too).
    assert (stats.prompt_tokens, stats.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"id": 1, "prompt": "a", "sampling_params": {
        "structured_outputs": {"choice": ["x"]}, "bad_words": ["x"]}}) + "\n")
    _, out = run(llama_dir, plain, tmp_path / "plain_out.jsonl")
    assert out[0]["error"] is None and out[0]["outputs"][0]["finish_reason"] == "abort"


def test_a_beam_search_row_takes_no_sampling_defaults(llama_dir, tmp_path):
    """Found by a hunt: a beam-search row that set no temperature was refused ("temperature must be
    0"), as was any under a model or job default of top_p or seed; vLLM's server ignores them for a
    beam search. What the row sets itself is still checked."""
    inp = tmp_path / "in.jsonl"
    rows = [{"id": 1, "prompt": "a b", "sampling_params": {"use_beam_search": True, "n": 2}},
            _openai_row("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                         "chat_template": TEMPLATE, "use_beam_search": True, "n": 2})]
    for i, row in enumerate(rows):
        inp.write_text(json.dumps(row) + "\n")
        stats, out = run(llama_dir, inp, tmp_path / f"out{i}.jsonl",
                         sampling={"temperature": 0.8, "top_p": 0.9, "seed": 3, "max_tokens": 4})
        assert (stats.completed, stats.errors) == (1, 0), out
    inp.write_text(json.dumps({"id": 1, "prompt": "a", "sampling_params": {"use_beam_search": True, "n": 2,
                                                                            "temperature": 0.5}}) + "\n")
    _, out = run(llama_dir, inp, tmp_path / "refused.jsonl")
    assert "temperature must be 0 with use_beam_search" in out[0]["error"]
