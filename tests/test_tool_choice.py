"""OpenAI's tools and tool_choice in batch chat bodies: a named function or "required" constrains
the output to calls and writes them as tool_calls; "none" only renders the tools; "auto" and
malformed tools are the row's error."""

import json
import logging

import jsonschema
import pytest
from transformers import AutoTokenizer

from conftest import CHAT_TEMPLATE
from pagedlm.entrypoints.jobs.openai_batch import OpenAIBatchFormat
from pagedlm.entrypoints.jobs.rows import RowError
from pagedlm.entrypoints.jobs.tool_choice import tool_choice_of
from pagedlm.entrypoints.jobs.runner import JobConfig, run_job
from test_jobs import _errors, _openai_row, by_id, read_output, write_jsonl

# A template that shows the tools to the model (their names: the test tokenizer's tokens are short).
TOOLS_TEMPLATE = "{% for tool in tools or [] %}{{ tool.function.name }} {% endfor %}" + CHAT_TEMPLATE
ENGINE = {"dtype": "float32", "max_model_len": 512, "max_num_seqs": 8}
UNIT = {"type": "function", "function": {"name": "set_unit", "description": "Pick a unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]}}}
MODE = {"type": "function", "function": {"name": "set_mode", "parameters": {
    "type": "object", "properties": {"mode": {"$ref": "#/$defs/Mode"}}, "required": ["mode"],
    "$defs": {"Mode": {"enum": ["on", "off"]}}}}}
NO_ARGS = {"type": "function", "function": {"name": "ping"}}
UNREADABLE = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": 5}}}


def _row(custom_id, template=TOOLS_TEMPLATE, **body):
    return _openai_row(custom_id, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "chat_template": template, "max_tokens": 300,
        "temperature": 0, **body})


def run(model, rows, tmp_path):
    config = JobConfig(input=write_jsonl(tmp_path / "in.jsonl", rows), output=str(tmp_path / "out.jsonl"), model=model,
                       engine=dict(ENGINE), trust_request_chat_template=True)
    stats, interrupted = run_job(config, tty=False)
    assert interrupted is None
    return stats, read_output(tmp_path / "out.jsonl")


def _parameters(name):
    tool = next(t for t in (UNIT, MODE, NO_ARGS) if t["function"]["name"] == name)
    return tool["function"].get("parameters", {"type": "object", "properties": {}})


def _check_call(call):
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call["function"]["arguments"]), _parameters(call["function"]["name"]))


def _no_whitespace(model_dir) -> dict[str, int]:
    """A logit_bias that keeps the random-weight model from the whitespace a JSON grammar allows
    anywhere (it would fill max_tokens with it)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {str(i): -100 for i in range(len(tokenizer)) if tokenizer.decode([i]) and not tokenizer.decode([i]).strip()}


def test_named_and_required_tool_choices_are_written_as_tool_calls(llama_dir, tmp_path):
    bias = _no_whitespace(llama_dir)
    rows = [
        _row("named", tools=[UNIT, MODE], tool_choice={"type": "function", "function": {"name": "set_mode"}},
             logit_bias=bias),
        _row("required", tools=[UNIT, MODE, NO_ARGS], tool_choice="required", logit_bias=bias),
        _row("one", tools=[UNIT, MODE], tool_choice="required", parallel_tool_calls=False, n=2, temperature=1.0,
             seed=3, logit_bias=bias),
        _row("none", tools=[UNIT], tool_choice="none", max_tokens=4),
    ]
    stats, out = run(llama_dir, rows, tmp_path)
    assert (stats.completed, stats.errors) == (4, 0)
    got = {key: row["response"]["body"]["choices"] for key, row in by_id(out, "custom_id").items()}
    named = got["named"][0]
    assert named["finish_reason"] == "stop" and named["message"]["content"] is None
    [call] = named["message"]["tool_calls"]
    assert call["function"]["name"] == "set_mode"
    _check_call(call)
    required = got["required"][0]
    assert required["finish_reason"] == "tool_calls" and required["message"]["content"] is None
    assert required["message"]["tool_calls"]
    for call in required["message"]["tool_calls"]:
        _check_call(call)
    assert len(got["one"]) == 2 and all(len(c["message"]["tool_calls"]) == 1 for c in got["one"])
    assert "tool_calls" not in got["none"][0]["message"] and isinstance(got["none"][0]["message"]["content"], str)


def test_the_tools_reach_the_template(llama_dir):
    fmt = OpenAIBatchFormat(AutoTokenizer.from_pretrained(llama_dir), ["tiny"], {}, trust_request_chat_template=True)
    for choice in ("none", "required", {"type": "function", "function": {"name": "set_unit"}}):
        prompt = fmt.parse(_row("a", tools=[UNIT], tool_choice=choice), "a").prompt
        assert prompt.text.startswith("set_unit ")


def test_tools_the_template_does_not_read(llama_dir, caplog):
    """With a call to make, the grammar still holds it to the parameters (warned once); with
    tool_choice "none" the tools would change nothing: the row's error."""
    fmt = OpenAIBatchFormat(AutoTokenizer.from_pretrained(llama_dir), ["tiny"], {}, trust_request_chat_template=True)
    plain = fmt.parse(_row("a", template=CHAT_TEMPLATE), "a").prompt
    with caplog.at_level(logging.WARNING, logger="pagedlm"):
        for key in ("a", "b"):
            job_row = fmt.parse(_row(key, template=CHAT_TEMPLATE, tools=[UNIT], tool_choice="required"), key)
            assert job_row.prompt == plain
            assert job_row.params.structured_outputs is not None
    assert sum("does not read tools" in r.message for r in caplog.records) == 1
    with pytest.raises(RowError, match="does not read tools") as exc:
        fmt.parse(_row("c", template=CHAT_TEMPLATE, tools=[UNIT], tool_choice="none"), "c")
    assert exc.value.param == "tools"


@pytest.mark.parametrize("body, param, message", [
    ({"tools": [UNIT]}, "tool_choice", '"auto" \\(the default beside tools\\) needs a parser'),
    ({"tools": [UNIT], "tool_choice": "auto"}, "tool_choice", "needs a parser"),
    ({"tool_choice": "required"}, "tool_choice", "needs body.tools"),
    ({"tools": [], "tool_choice": "required"}, "tools", "non-empty list"),
    ({"tools": [UNIT], "tool_choice": "any"}, "tool_choice", 'must be one of "none", "auto", "required"'),
    ({"tools": [UNIT], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     '"nope", which is not in body.tools'),
    ({"tools": [UNIT], "tool_choice": {"type": "function", "name": "set_unit"}}, "tool_choice", "to name a function"),
    ({"tools": [UNIT, UNIT], "tool_choice": "required"}, "tools", '"set_unit" twice'),
    # Found by a hunt: "body: structured_outputs.json: 'utf-8' codec can't encode", of a row with no
    # structured_outputs; under a named choice the name was written in the call as it was.
    ({"tools": [{"type": "function", "function": {"name": "f\ud800"}}], "tool_choice": "required"}, "tools",
     r"tools\[0\]\.function\.name is not valid Unicode \(surrogates not allowed at character 1\)"),
    ({"tools": [{"type": "function", "function": {"name": "f\ud800"}}],
      "tool_choice": {"type": "function", "function": {"name": "f\ud800"}}}, "tools", "name is not valid Unicode"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools", "the only tool type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}], "tool_choice": "required"},
     "tools", "parameters must be a JSON schema object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "params": {}}}], "tool_choice": "required"},
     "tools", "function must be an object with"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}], "tool_choice": "required"},
     "tools", "description must be a string"),
    ({"tools": [UNIT, {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "multipleOf": 3}}}}}], "tool_choice": "required"}, "tools",
     r'tools\[1\]\.function\.parameters \("g"\): keyword multipleOf: cannot be enforced'),
    # Found by session 43: xgrammar's own refusal reached the row as "tools.json does not compile".
    ({"tools": [UNIT, UNREADABLE], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tools",
     r'^body\.tools\[1\]\.function\.parameters \("g"\): properties must be an object$'),
    # ... and a function of an empty anyOf was written as '"parameters":' with no value
    ({"tools": [{"type": "function", "function": {"name": "g", "parameters": {"anyOf": []}}}],
      "tool_choice": "required"}, "tools", r'tools\[0\]\.function\.parameters \("g"\): anyOf \[\] \(no value'),
    ({"tools": [UNIT], "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls", "true or false"),
    ({"tools": [UNIT], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "give one"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/properties/b"}, "b": {"type": "integer"}}}}}],
      "tool_choice": "required"}, "tools", 'not "#/properties/b"'),
    ({"tools": [MODE, {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "$defs": {"Mode": {"enum": ["x"]}}}}}], "tool_choice": "required"}, "tools",
     '\\$defs "Mode" twice'),
])
def test_bad_tools_are_the_rows_error_naming_the_field(llama_dir, tmp_path, body, param, message):
    fmt = OpenAIBatchFormat(AutoTokenizer.from_pretrained(llama_dir), ["tiny"], {}, trust_request_chat_template=True)
    with pytest.raises(RowError, match=message) as exc:
        fmt.parse(_row("a", **body), "a")
    assert exc.value.param == param


@pytest.mark.parametrize("choice", ["none", {"type": "function", "function": {"name": "set_unit"}}])
def test_a_tool_the_choice_does_not_compile_is_not_read_by_xgrammar(llama_dir, choice):
    """A review: xgrammar's converter refused parameters that the choice never compiles (vLLM
    compiles only the chosen function's, and none for "none")."""
    fmt = OpenAIBatchFormat(AutoTokenizer.from_pretrained(llama_dir), ["tiny"], {}, trust_request_chat_template=True)
    assert fmt.parse(_row("a", tools=[UNIT, UNREADABLE], tool_choice=choice), "a").context.tool_choice is not None


def test_a_bad_tool_row_fails_alone_in_a_job(llama_dir, tmp_path):
    rows = [_row("auto", tools=[UNIT]), _row("ok", tools=[UNIT], tool_choice="required")]
    stats, out = run(llama_dir, rows, tmp_path)
    assert (stats.completed, stats.errors) == (1, 1)
    assert _errors(out)["auto"][0] == "tool_choice"


def test_texts_that_are_no_calls():
    """A "required" text cut off by max_tokens stays the content (no call, nothing lost); an empty
    named call is none; the parameters of "required" are written back as JSON text."""
    required = tool_choice_of({"tools": [UNIT], "tool_choice": "required"})
    assert required.message('[{"name": "set_u', "length") == ({"content": '[{"name": "set_u'}, "length")
    assert required.message(None, "length") == ({"content": None}, "length")  # a reasoning that never ended
    message, reason = required.message('[{"name": "set_unit", "parameters": {"unit": "é"}}]', "stop")
    assert reason == "tool_calls" and message["tool_calls"][0]["function"]["arguments"] == '{"unit": "é"}'
    named = tool_choice_of({"tools": [UNIT], "tool_choice": {"type": "function", "function": {"name": "set_unit"}}})
    assert named.message(" ", "length") == ({"content": None}, "length")
    none = tool_choice_of({"tools": [UNIT], "tool_choice": "none"})
    assert none.message(None, "length") == ({"content": None}, "length")
    assert tool_choice_of({"tool_choice": "none"}) is None


def test_parquet_nulls_in_tools_are_unset():
    tool = {"type": "function", "function": {"name": "f", "description": None, "strict": None, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": None}}}}
    choice = tool_choice_of({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert choice.tools == [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}]
    assert choice.schema == {"type": "object", "properties": {"a": {"type": "integer"}}}


def test_parquet_rows_tools_take_no_other_rows_const(llama_dir, tmp_path):
    """Found by a review: a Parquet struct gave row "free" the other row's const as null, which
    bound its argument to null (or made xgrammar refuse it). In Arrow rows a null is unset even
    under const; in JSON rows a const null is a value."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    bias = _no_whitespace(llama_dir)

    def tool(mode):
        return {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"mode": mode}, "required": ["mode"]}}}

    rows = [_row("free", tools=[tool({"type": "string", "maxLength": 3})], tool_choice="required", logit_bias=bias),
            _row("on", tools=[tool({"const": "on"})], tool_choice="required", logit_bias=bias)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    config = JobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out.jsonl"), model=llama_dir,
                       engine=dict(ENGINE), trust_request_chat_template=True)
    stats, _ = run_job(config, tty=False)
    assert (stats.completed, stats.errors) == (2, 0)
    calls = {r["custom_id"]: json.loads(r["response"]["body"]["choices"][0]["message"]["tool_calls"][0]["function"]
                                        ["arguments"]) for r in read_output(tmp_path / "out.jsonl")}
    assert isinstance(calls["free"]["mode"], str) and calls["on"] == {"mode": "on"}
    null_const = {"tools": [tool({"const": None})], "tool_choice": "required"}
    assert tool_choice_of(null_const).schema["items"]["properties"]["parameters"]["properties"]["mode"] == {"const": None}
    assert tool_choice_of(null_const, value_nulls=False).schema["items"]["properties"]["parameters"]["properties"]["mode"] == {}
