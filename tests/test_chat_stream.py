"""``LLM.chat`` (a chat template renders each conversation; parity with Hugging Face; every bad
conversation listed before any work) and ``LLM.generate_as_completed`` (lazy reading, a bounded
window, results as they finish, errors returned or raised, closing early, one iteration at a time)."""

import copy
import json
import re
import shutil
from contextlib import closing

import pytest
from transformers import AutoTokenizer

from conftest import BOS, CHAT_TEMPLATE as TEMPLATE, EOS, hf_greedy
from pagedlm import LLM, RequestOutput, SamplingParams, default_model_path
from pagedlm.entrypoints.chat_utils import RenderedChat, detect_content_format, parse_conversation, render_chat
from pagedlm.entrypoints.llm import _TOKENIZE_CHUNK
from pagedlm.utils import FieldError

GREEDY = SamplingParams(temperature=0, max_tokens=8)
DEFAULT_MAX_TOKENS = 3  # the checkpoint's generation config: greedy, 3 new tokens
PROMPTS = ["Hello, my name is", {"prompt": "The capital of France is"}, {"prompt_token_ids": [BOS, 40, 41, 42]},
           "Continuous batching", "12 + 30 =", {"prompt_token_ids": [BOS] + list(range(10, 60))}]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def rendered(text: str) -> str:
    """What TEMPLATE makes of ``user(text)`` with a generation prompt."""
    return f"<s><|user|>{text}\n<|assistant|>"


def exact(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(llama_dir, tmp_path_factory) -> LLM:
    # llama_dir's weights and tokenizer (no chat template), with greedy sampling defaults.
    path = tmp_path_factory.mktemp("chat_stream") / "m"
    shutil.copytree(llama_dir, path)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": False, "max_new_tokens": DEFAULT_MAX_TOKENS}
    ))
    llm = LLM(str(path), dtype="float32", max_model_len=256)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (0, DEFAULT_MAX_TOKENS)
    return llm


@pytest.fixture(autouse=True)
def engine_left_clean(llm):
    """After every test: nothing queued and every KV block free."""
    yield
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    stats = engine.get_stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


# --- LLM.chat ---------------------------------------------------------------------------------


def test_chat_is_token_identical_to_hugging_face(llm, llama_dir):
    conversations = [
        user("Hello, my name is"),
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France is"},
         {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And 12 + 30 ="}],
    ]
    hf_tok = AutoTokenizer.from_pretrained(llama_dir)
    hf_ids = [hf_tok.apply_chat_template(c, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True)
              for c in conversations]
    hf_ids = [ids["input_ids"] if not isinstance(ids, list) else ids for ids in hf_ids]
    outs = llm.chat(conversations, GREEDY, use_tqdm=False, chat_template=TEMPLATE)
    assert [o.prompt_token_ids for o in outs] == hf_ids
    assert all(o.prompt_token_ids[0] == BOS and o.prompt_token_ids.count(BOS) == 1 for o in outs)
    assert outs[0].prompt == rendered("Hello, my name is")
    assert outs[1].prompt == ("<s><|system|>Be brief.\n<|user|>The capital of France is\n<|assistant|>Paris.\n"
                              "<|user|>And 12 + 30 =\n<|assistant|>")
    assert token_ids(outs) == hf_greedy(llama_dir, hf_ids, GREEDY.max_tokens)


def test_one_conversation_or_a_list_of_them(llm):
    one = llm.chat(user("Hello"), exact(2), use_tqdm=False, chat_template=TEMPLATE)
    assert isinstance(one, list) and len(one) == 1 and isinstance(one[0], RequestOutput)
    assert one[0].prompt == rendered("Hello")
    texts = ["Hello", "The quick brown fox", "Paris"]
    # The last conversation finishes first; outputs still come back in input order.
    many = llm.chat([user(t) for t in texts], [exact(6), exact(4), exact(2)], use_tqdm=False,
                    chat_template=TEMPLATE)
    assert [o.prompt for o in many] == [rendered(t) for t in texts]
    assert [len(ids) for ids in token_ids(many)] == [6, 4, 2]
    assert token_ids(many)[0][:2] == token_ids(one)[0]


def _refused(llm, monkeypatch, conversations, **kwargs) -> str:
    """The ValueError message ``chat`` raises, checking that no request reached the engine."""
    with monkeypatch.context() as m:
        m.setattr(llm.llm_engine, "add_request", lambda *a, **k: pytest.fail("a request was added"))
        with pytest.raises(ValueError) as err:
            llm.chat(conversations, GREEDY, use_tqdm=False, **{"chat_template": TEMPLATE, **kwargs})
    return str(err.value)


def test_every_bad_conversation_is_listed_before_any_work(llm, monkeypatch):
    msg = _refused(llm, monkeypatch, [
        user("fine"),
        [{"role": 7, "content": "hi"}],
        [{"role": "user", "content": 5}],
        [],
        user("also fine"),
    ])
    assert "3 of 5 conversations are invalid" in msg
    assert "conversation 1: message 0: 'role' must be a str (e.g. 'user'), got int" in msg
    assert "conversation 2: message 0: 'content'" in msg and "int" in msg
    assert "conversation 3: a conversation must have at least one message" in msg
    assert "conversation 0:" not in msg and "conversation 4:" not in msg

    msg = _refused(llm, monkeypatch, [user("a"), user("b")], continue_final_message=True)
    assert "2 of 2 conversations" in msg and "conversation 0:" in msg and "conversation 1:" in msg
    assert "add_generation_prompt and continue_final_message" in msg

    assert not llm.llm_engine.has_unfinished_requests()
    assert len(token_ids(llm.chat(user("fine"), exact(2), use_tqdm=False, chat_template=TEMPLATE))[0]) == 2


@pytest.mark.parametrize("options, message", [
    ({"tools": [5]}, r"tools must be a list of tool definitions \(objects\), got \[5\]"),
    ({"chat_template_kwargs": {"tools": ["f"]}}, r"chat_template_kwargs.tools must be a list of tool definitions"),
    # Where the argument is None, the template variable is what the template gets.
    ({"add_generation_prompt": None, "chat_template_kwargs": {"add_generation_prompt": "yes"}},
     "chat_template_kwargs.add_generation_prompt must be True or False, got 'yes'"),
    ({"chat_template_kwargs": {"chat_template": 3}}, "chat_template_kwargs.chat_template must be a string"),
])
def test_chat_options_given_as_template_variables_are_checked_too(llm, monkeypatch, options, message):
    msg = _refused(llm, monkeypatch, [user("a")], **options)
    assert re.search(f"conversation 0: {message}", msg), msg


def test_no_chat_template_anywhere_is_a_clear_error(llm, monkeypatch):
    assert llm.get_tokenizer().chat_template is None
    assert "conversation 0: the tokenizer has no chat template; pass chat_template=" in _refused(
        llm, monkeypatch, user("Hello"), chat_template=None)


def test_continue_final_message_extends_the_last_message(llm):
    conversation = user("The capital of France is") + [{"role": "assistant", "content": "The capital"}]
    out = llm.chat(conversation, exact(2), use_tqdm=False, chat_template=TEMPLATE,
                   add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt == "<s><|user|>The capital of France is\n<|assistant|>The capital"
    assert out.prompt_token_ids == llm.get_tokenizer()(out.prompt, add_special_tokens=False).input_ids


def test_developer_messages_and_tool_only_turns_render_as_in_vllm():
    """Found against vLLM: a template that does not know the "developer" role gets it as "system",
    system messages merged at the start; an assistant turn of tool calls only has empty content."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())

    def text(messages, template=None):
        return render_chat(tokenizer, messages, template).text

    dev, hi = {"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}
    assert text([dev, hi]) == text([{"role": "system", "content": "Be terse."}, hi])
    assert text([{"role": "system", "content": "A"}, hi, {**dev, "content": "B"}]) == text(
        [{"role": "system", "content": "A\n\nB"}, hi])
    knows = "{% for m in messages %}{% if m['role'] == 'developer' %}D:{% endif %}{{ m['content'] }}|{% endfor %}"
    assert text([dev, hi], knows) == "D:Be terse.|Hi|"
    # A hunt: a template that loops over content parts ("openai" format) got the merged system
    # message as text and rendered none of it.
    parts = "{% for m in messages %}{{ m['role'] }}:{% for p in m['content'] %}{{ p['text'] }}{% endfor %}|{% endfor %}"
    system = {"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "a"}]}
    assert text([system, hi, {**dev, "content": "B"}], parts) == "system:A\na\n\nB|user:Hi|"
    assert text([hi, dev], parts) == "system:Be terse.|user:Hi|"
    assert text([dev, hi], parts) == "system:Be terse.|user:Hi|"
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    turns = [hi, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "4"}]
    assert text(turns) == text([hi, {**turns[1], "content": ""}, turns[2]])


def test_text_parts_are_joined_and_other_parts_refused(llm, monkeypatch):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert llm.chat(parts, exact(1), use_tqdm=False, chat_template=TEMPLATE)[0].prompt == rendered("a\nb")
    image = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    msg = _refused(llm, monkeypatch, [{"role": "user", "content": image}])
    assert "conversation 0: message 0: content part {'type': 'image_url'" in msg and "no multimodal inputs" in msg
    msg = _refused(llm, monkeypatch, [{"role": "user", "content": [{"text": "no type"}]}])
    assert "is not text" in msg and "type text, input_text, output_text, refusal, thinking or tool_reference" in msg


def test_message_forms_vllm_accepts_render_as_in_vllm(llm):
    """Found against vLLM 0.32 (prompts its LLM.chat rendered with TEMPLATE): any role string goes
    to the template as it is; null or absent content is empty; content parts may be plain strings
    and input_text, output_text, refusal or thinking parts, joined with newlines, skipping null or
    empty texts. (vLLM also skips a part without its text key and drops unknown message keys;
    pagedlm refuses both: test_misspelt_message_keys_are_refused.)"""
    def prompts(*conversations) -> list[str]:
        return [o.prompt for o in llm.chat(list(conversations), exact(1), use_tqdm=False, chat_template=TEMPLATE)]

    q = user("q")
    assert prompts(
        [{"role": "ipython", "content": "out"}],
        [{"role": "narrator", "content": "n"}, {"role": "user", "content": "u"}],
        [{"role": "user", "content": None}],
        [{"role": "user"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
        [{"role": "user", "content": ["What is", "2+2?"]}],
        [{"role": "user", "content": [{"type": "input_text", "text": "I"}, {"type": "text", "text": "T"}]}],
        q + [{"role": "assistant", "content": [{"type": "output_text", "text": "O"}]}],
        q + [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
        [{"role": "user", "content": [{"type": "thinking", "thinking": "hmm"}]}],
        [{"role": "user", "content": [{"type": "text", "text": None}, {"type": "refusal", "refusal": None}, "", "B"]}],
        [{"role": "user", "content": []}],
    ) == [
        "<s><|ipython|>out\n<|assistant|>",
        "<s><|narrator|>n\n<|user|>u\n<|assistant|>",
        rendered(""),
        rendered(""),
        "<s><|user|>a\n<|assistant|>\n<|assistant|>",
        rendered("What is\n2+2?"),
        rendered("I\nT"),
        "<s><|user|>q\n<|assistant|>O\n<|assistant|>",
        "<s><|user|>q\n<|assistant|>no\n<|assistant|>",
        rendered("hmm"),
        rendered("B"),
        rendered(""),
    ]



def test_misspelt_message_keys_are_refused(llm):
    """A key that is not a message field (a misspelt "content" would leave the message empty), a
    name or task that is not a str, and a text part without its text are refused, naming them;
    the fields of a response's assistant message handed back are taken (and not rendered, as in vLLM)."""
    for message, match in [
        ({"role": "user", "contnet": "q"},
         r"message 0 has unknown key\(s\) 'contnet'; a message takes 'role', 'content'"),
        ({"role": "user", "content": "q", "name": 5}, "message 0: 'name' must be a str, got int"),
        ({"role": "user", "content": [{"type": "text", "txt": "q"}]}, "message 0: a 'text' part has no 'text'"),
        ({"role": "user", "content": [{"type": "refusal"}]}, "message 0: a 'refusal' part has no 'refusal'"),
    ]:
        with pytest.raises(ValueError, match=match):
            llm.chat([message], exact(1), use_tqdm=False, chat_template=TEMPLATE)
    # The OpenAI SDK's ChatCompletionMessage.model_dump(), and vLLM's reasoning_content.
    handed_back = {"content": "O", "refusal": None, "role": "assistant", "annotations": [], "audio": None,
                   "function_call": None, "tool_calls": None, "reasoning_content": "r", "weight": None}  # null: absent
    out = llm.chat(user("q") + [handed_back, *user("again")], exact(1), use_tqdm=False, chat_template=TEMPLATE)[0]
    assert out.prompt == "<s><|user|>q\n<|assistant|>O\n<|user|>again\n<|assistant|>"


# Each message as the JSON the template gets (key order included).
DUMP = "{% for m in messages %}{{ m | tojson }}|{% endfor %}"
# Templates written after Gemma 3's and Llama 4's, which loop over a message's content parts.
PARTS = ("{% for m in messages %}{{ m['role'] }}:{% if m['content'] is string %}{{ m['content'] }}{% else %}"
         "{% for part in m['content'] %}[{{ part['text'] }}]{% endfor %}{% endif %}|{% endfor %}")
PARTS_IN_MACRO = ("{% macro body(c) %}{% for p in c %}[{{ p.text }}]{% endfor %}{% endmacro %}"
                  "{% set loop_messages = messages %}{% for m in loop_messages %}{{ body(m.content) }}|{% endfor %}")


@pytest.mark.parametrize("template, expected", [
    (TEMPLATE, "string"), (DUMP, "string"), (PARTS, "openai"), (PARTS_IN_MACRO, "openai"),
    ("{% for message in messages %}{% set content = message.content %}{% for c in content %}{{ c.text }}"
     "{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages[1:] %}{% for p in m['content'] | reverse %}{{ p }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% for line in m.content.split('\\n') %}{{ line }}{% endfor %}{% endfor %}", "string"),
    # Found by a review against vLLM's _detect_content_format: what it does not follow is "string"
    # (a namespace attribute or a tuple), assignments count in any order, an inner macro's loop
    # over the outer macro's content parameter counts, a template that does not parse is "string".
    ("{% set ns = namespace() %}{% set ns.m = messages[1:] %}{% for m in ns.m %}{% for p in m.content %}"
     "{% endfor %}{% endfor %}", "string"),
    ("{% for m in messages %}{% for a, b in m.content %}{% endfor %}{% endfor %}", "string"),
    ("{% for m in later %}{% for p in m.content %}{% endfor %}{% endfor %}{% set later = early %}"
     "{% set early = messages %}", "openai"),
    ("{% macro outer(content) %}{% macro inner(x) %}{% for p in content %}{% endfor %}{% endmacro %}"
     "{{ inner(1) }}{% endmacro %}{% for m in messages %}{{ outer(m.content) }}{% endfor %}", "openai"),
    ("{{ m.content | nosuchfilter }}", "string"),
])
def test_the_content_format_is_detected_from_the_template_as_vllm_does(template, expected):
    assert detect_content_format(template) == expected


def test_content_formats_and_the_fields_a_message_keeps_are_vllms():
    """Found against vLLM 0.32's LLM.chat: a template that loops over a message's content gets a
    list of text parts ("auto" detects it; each part keeps its other keys), where pagedlm gave it
    the joined text and such templates rendered parts as characters or nothing; a message keeps
    only the fields vLLM keeps, in its order; an empty tool_calls is dropped (Llama 3.1's template
    refused the turn); Claude Code's billing header line leaves a system message. Unlike vLLM
    (found by a hunt), an assistant's reasoning under its older names (reasoning_content, thinking)
    is its reasoning, as transformers reads them (vLLM drops them unseen), and another role's field
    on a message is refused (vLLM drops it)."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())

    def text(messages, template, **options):
        return render_chat(tokenizer, messages, template, **options).text

    parts = [{"role": "user", "content": [{"type": "text", "text": "a "}, " b", {"type": "text", "text": ""}]},
             {"role": "assistant", "content": None}, {"role": "tool", "content": [{"type": "text", "text": "t"}]}]
    assert text(parts, PARTS) == "user:[a ][ b][]|assistant:|tool:t|"
    assert text(parts, PARTS, chat_template_content_format="string") == "user:a \n b|assistant:|tool:t|"
    assert text(parts, DUMP, chat_template_content_format="openai").startswith(
        '{"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": " b"}')
    tagged = [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}]
    assert text(tagged, DUMP, chat_template_content_format="openai") == (
        '{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}|')
    # Found by a hunt: vLLM 0.32's tool_reference part (a deferred tool, for the template to expand)
    # was refused as multimodal. Its name in "string"; the part itself in "openai", where a tool
    # message holding one keeps its parts.
    refs = [{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "tool_reference", "name": "f"}]},
            {"role": "tool", "content": [{"type": "tool_reference", "name": "g"}, {"type": "text", "text": "t"}]},
            {"role": "developer", "content": [{"type": "tool_reference", "name": "h"}]}]
    assert text(refs, DUMP, chat_template_content_format="string") == (
        '{"role": "system", "content": "h"}|{"role": "user", "content": "see\\nf"}|{"role": "tool", "content": "g\\nt"}|')
    assert text(refs[:2], DUMP, chat_template_content_format="openai") == (
        '{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "tool_reference", "name": "f"}]}|'
        '{"role": "tool", "content": [{"type": "tool_reference", "name": "g"}, {"type": "text", "text": "t"}]}|')
    with pytest.raises(ValueError, match="message 0: a 'tool_reference' part's 'name' must be a str, got None"):
        text([{"role": "user", "content": [{"type": "tool_reference"}]}], DUMP)
    # Found by a hunt: the template's own recursion failed ("the chat template failed: RecursionError").
    from pagedlm.utils import MAX_JSON_DEPTH

    deep: object = 1
    for _ in range(3000):
        deep = {"a": deep}
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}
    for field, options in (("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]}),
                           ("chat_template_kwargs", {"chat_template_kwargs": {"x": deep}}),
                           ("messages", {"conversation": [{"role": "assistant", "content": "", "tool_calls": [call]}]})):
        conversation = options.pop("conversation", [{"role": "user", "content": "q"}])
        with pytest.raises(FieldError, match=f"{field} nests objects and arrays more than {MAX_JSON_DEPTH} levels") as info:
            text(conversation, DUMP, **options)
        assert info.value.field == field
    with pytest.raises(FieldError, match="chat_template_content_format must be one of auto, string, openai"):
        text(parts, PARTS, chat_template_content_format="list")
    # "openai" for a template that reads text: the format is named as the field at fault.
    with pytest.raises(FieldError, match="this template reads text: 'string' or 'auto'") as info:
        text(parts, "{% for m in messages %}{{ m['content'] + '|' }}{% endfor %}", chat_template_content_format="openai")
    assert info.value.field == "chat_template_content_format"

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "u", "name": "bob", "refusal": "", "tool_calls": (), "tools": {}},  # empty: absent
        {"role": "assistant", "content": "a", "refusal": "r", "tool_calls": []},
        {"role": "assistant", "content": "b", "tool_calls": [call]},
        {"role": "tool", "content": "t", "name": "f", "tool_call_id": "c1", "task": "t1"},
    ]
    assert text(messages, DUMP) == (
        '{"role": "user", "content": "u", "name": "bob"}|{"role": "assistant", "content": "a"}|'
        '{"role": "assistant", "content": "b", "tool_calls": [{"id": "c1", "type": "function", "function": '
        '{"name": "f", "arguments": {}}}]}|'
        '{"role": "tool", "content": "t", "tool_call_id": "c1", "name": "f", "task": "t1"}|')
    reasoning = "{% for m in messages %}{{ m.reasoning_content }},{{ m.reasoning }}{% endfor %}"
    for key in ("reasoning", "reasoning_content", "thinking"):
        assert text([{"role": "assistant", "content": "b", key: "why"}], reasoning) == "why,why", key
        # transformers' apply_chat_template reads each name as reasoning_content.
        assert tokenizer.apply_chat_template([{"role": "assistant", "content": "b", key: "why"}],
                                             chat_template="{{ messages[0].reasoning_content }}", tokenize=False) == "why"
    assert text([{"role": "assistant", "content": "b", "reasoning": "why", "thinking": "why"}], reasoning) == "why,why"
    for message, match in [
        ({"role": "assistant", "content": "b", "reasoning": "a", "reasoning_content": "b"},
         "message 0: 'reasoning', 'reasoning_content' are names of one field, the message's reasoning, and differ"),
        ({"role": "assistant", "content": "b", "thinking": 5}, "message 0: 'thinking' must be a str, got int"),
        ({"role": "user", "content": "u", "refusal": "r", "tool_calls": [call]},
         "message 0 is a 'user' message: 'tool_calls' is an assistant message's; 'refusal' is an assistant message's"),
        ({"role": "assistant", "content": "a", "tool_call_id": "c1"}, "'tool_call_id' is a tool message's"),
        ({"role": "system", "content": "s", "tools": [{"type": "function"}]}, "'tools' is a developer message's"),
        ({"role": "user", "content": "u", "reasoning_content": "r"}, "'reasoning_content' is an assistant message's"),
    ]:
        with pytest.raises(FieldError, match=re.escape(match)) as info:
            text([message], DUMP)
        assert info.value.field == "messages"
    billed = [{"role": "system", "content": "x-anthropic-billing-header: cch=1\nBe brief."}, user("hi")[0]]
    assert text(billed, DUMP) == '{"role": "system", "content": "Be brief."}|{"role": "user", "content": "hi"}|'
    kept = [{"role": "system", "content": [{"type": "input_text", "text": "x-anthropic-billing-header: a\nb"}]}]
    assert text(kept, DUMP) == '{"role": "system", "content": "x-anthropic-billing-header: a\\nb"}|'  # text parts only
    # vLLM passes a developer message's tools, null where absent (transformers 5.25 then drops null keys).
    assert parse_conversation([{"role": "developer", "content": "d"}]) == [{"role": "developer", "content": "d",
                                                                          "tools": None}]
    # A tokenizer's own template that does not compile is the conversation's error, not jinja2's
    # exception out of the content format's detection (found by a review).
    broken = copy.copy(tokenizer)
    broken.chat_template = "{{ messages[0].content | nosuchfilter }}"
    with pytest.raises(FieldError, match="the chat template failed: TemplateAssertionError"):
        render_chat(broken, user("hi"))


def test_chat_template_names_files_and_text_everywhere(llm, tmp_path):
    """A chat_template may name one of the tokenizer's templates, or be a file or template text, in
    LLM.chat, job rows and batch bodies alike (found by a hunt: rows and bodies passed a path or
    a word on to the tokenizer, which made it the whole prompt)."""
    tokenizer = llm.get_tokenizer()
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert render_chat(tokenizer, user("hi"), str(path)).text == rendered("hi")
    assert llm.chat(user("hi"), exact(1), use_tqdm=False, chat_template=path)[0].prompt == rendered("hi")
    for word in ("hello", str(tmp_path / "missing.jinja")):
        with pytest.raises(FieldError, match="chat_template must be a Jinja template or a path to one") as info:
            render_chat(tokenizer, user("hi"), word)
        assert info.value.field == "chat_template"
    named = copy.copy(tokenizer)
    named.chat_template = {"default": TEMPLATE, "tool_use": DUMP}
    assert render_chat(named, user("hi"), "tool_use").text == '{"role": "user", "content": "hi"}|'
    with pytest.raises(FieldError, match=r"is no file; or name one of the tokenizer's templates: default, tool_use$"):
        render_chat(named, user("hi"), "other")

# --- LLM.generate_as_completed --------------------------------------------------------------


def test_a_generator_is_read_lazily(llm):
    pulled = 0

    def prompts():
        nonlocal pulled
        for i in range(500):
            pulled += 1
            yield {"prompt_token_ids": [BOS, 10 + i % 50]}

    with closing(llm.generate_as_completed(prompts(), exact(2), max_in_flight=4)) as results:
        index, out = next(results)
        assert isinstance(out, RequestOutput) and 0 <= index < 4
        assert len(llm.llm_engine.seq_groups) <= 4
        assert pulled <= 4 + _TOKENIZE_CHUNK and pulled < 500


def test_each_index_once_with_the_outputs_generate_gives(llm):
    params = [exact(n) for n in range(len(PROMPTS) + 2, 2, -1)]  # later prompts finish sooner
    expected = token_ids(llm.generate(PROMPTS, params, use_tqdm=False))
    indices, got = [], {}
    for index, out in llm.generate_as_completed(PROMPTS, params, max_in_flight=3):
        indices.append(index)
        got[index] = out.outputs[0].token_ids
    assert sorted(indices) == list(range(len(PROMPTS))) and indices != sorted(indices)
    assert [got[i] for i in range(len(PROMPTS))] == expected


BAD = ["Hello", "Paris", {"prompt_token_ids": []}, {"prompt_token_ids": list(range(3, 300))}, "fox"]


def test_return_errors_yields_each_bad_prompt_and_runs_the_rest(llm):
    results = dict(llm.generate_as_completed(BAD, exact(2), return_errors=True))
    assert sorted(results) == list(range(len(BAD)))
    assert isinstance(results[2], ValueError) and "empty" in str(results[2])
    assert isinstance(results[3], ValueError) and "max_model_len" in str(results[3])
    assert all(isinstance(results[i], RequestOutput) and results[i].finished for i in (0, 1, 4))


@pytest.mark.parametrize("max_in_flight", [1, 2, None])
def test_a_window_of_only_bad_prompts_does_not_end_the_input(llm, max_in_flight):
    """Found by a hunt: when a whole window of prompts was refused with nothing in flight, the loop
    ended and the prompts after them never ran (a job wrote no rows for them and exited 0)."""
    prompts = ["a", {"prompt_token_ids": []}, "b", "c"] + [{"prompt_token_ids": []}] * 20 + ["d", "e"]
    results = dict(llm.generate_as_completed(prompts, exact(2), return_errors=True, max_in_flight=max_in_flight))
    assert sorted(results) == list(range(len(prompts)))
    assert [i for i, r in sorted(results.items()) if isinstance(r, RequestOutput)] == [0, 2, 3, 24, 25]


def test_without_return_errors_the_earlier_prompts_finish_then_it_raises(llm):
    seen = []
    with pytest.raises(ValueError, match="prompt 2 cannot run: the prompt is empty"):
        for index, out in llm.generate_as_completed(BAD, exact(2)):
            assert isinstance(out, RequestOutput)
            seen.append(index)
    assert sorted(seen) == [0, 1]  # both were in flight when prompt 2 was read
    assert not llm.llm_engine.has_unfinished_requests()


def test_no_prompt_after_a_bad_one_is_run(llm):
    def prompts():
        yield from BAD

    seen = []
    with pytest.raises(ValueError, match="no later prompt was run"):
        for index, _ in llm.generate_as_completed(prompts(), exact(2)):
            seen.append(index)
    assert sorted(seen) == [0, 1]
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("num_params", [2, 6])
def test_sampling_params_of_another_length_are_refused(llm, num_params):
    with pytest.raises(ValueError, match="sampling_params has"):  # sized: at once
        llm.generate_as_completed(PROMPTS[:4], [exact(1)] * num_params)
    with pytest.raises(ValueError, match="sampling_params (ran out|has more)"):  # iterators: when it shows
        list(llm.generate_as_completed(iter(PROMPTS[:4]), iter([exact(1)] * num_params)))
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_single_rendered_chat_is_one_prompt(llm):
    rendered = render_chat(llm.get_tokenizer(), [{"role": "user", "content": "Hi"}], TEMPLATE)
    assert isinstance(rendered, RenderedChat)
    text = rendered.text
    out = llm.generate(rendered, exact(2), use_tqdm=False)
    assert len(out) == 1 and out[0].prompt == text and out[0].prompt_token_ids.count(BOS) == 1


def test_tools_and_tool_call_arguments_reach_the_template_as_vllm_passes_them(llm):
    """``tools`` go to the template; a tool call's JSON-text arguments arrive parsed, so a template's
    ``tojson`` writes them once (not as a JSON string of JSON). An empty list of conversations is
    none."""
    template = ("{% if tools %}TOOLS {{ tools | tojson }}; {% endif %}{% for m in messages %}{{ m.role }}: "
                "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments | tojson }}{% else %}{{ m.content }}"
                "{% endif %}; {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = render_chat(llm.get_tokenizer(), conversation, template, tools=tools).text
    assert text == ('TOOLS [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]; '
                    'user: Weather in Paris?; assistant: {"city": "Paris"}; tool: sunny; assistant:')
    assert conversation[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the caller's is kept
    # Arguments that are no JSON object become {} (vLLM coerces them, so that a conversation whose
    # history holds one can go on); a call that is not of type "function" is refused.
    for arguments in ("{oops", "null", "42", "[1, 2]", [1, 2], 7, "", None):
        bad = [{**conversation[1], "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": arguments}}]}]
        assert render_chat(llm.get_tokenizer(), bad, template).text == "assistant: {}; assistant:"
    for call in ({"type": "custom", "function": {"name": "w"}}, "x", {"type": "function"}):
        with pytest.raises(ValueError, match="message 0: each of tool_calls must be an object of type 'function'"):
            render_chat(llm.get_tokenizer(), [{**conversation[1], "tool_calls": [call]}], template)
    for calls in (conversation[1]["tool_calls"][0], "c1", 7):  # a dict's iteration gives its keys
        with pytest.raises(ValueError, match="message 0: tool_calls must be a list of tool calls, got "):
            render_chat(llm.get_tokenizer(), [{**conversation[1], "tool_calls": calls}], template)
    calls = (call for call in conversation[1]["tool_calls"])  # any other iterable, as vLLM takes
    assert render_chat(llm.get_tokenizer(), [{**conversation[1], "tool_calls": calls}], template).text == \
        'assistant: {"city": "Paris"}; assistant:'
    out = llm.chat(conversation[:1], exact(2), use_tqdm=False, chat_template=template, tools=tools)
    assert out[0].prompt.startswith("TOOLS ") and len(out[0].outputs[0].token_ids) == 2
    assert llm.chat([], exact(2), use_tqdm=False, chat_template=template) == []


def test_chat_template_kwargs_give_way_to_the_arguments_as_in_vllm(llm):
    """Found against vLLM 0.32, whose ``LLM.chat`` merges ``chat_template_kwargs`` under its own
    arguments (``merge_kwargs``): ``add_generation_prompt`` and ``continue_final_message`` always
    win, ``tools`` and ``chat_template`` when they are not None; other keys reach the template.
    (vLLM ignores a ``tokenize`` there; pagedlm refuses it, as it accepts nothing it ignores.)"""
    tokenizer = llm.get_tokenizer()
    out = llm.chat(user("hi"), exact(1), use_tqdm=False, chat_template=TEMPLATE,
                   chat_template_kwargs={"add_generation_prompt": False})
    assert out[0].prompt == rendered("hi")

    def text(**kwargs) -> str:
        return render_chat(tokenizer, user("hi"), **{"chat_template": TEMPLATE, **kwargs}).text

    assert text(add_generation_prompt=False, chat_template_kwargs={"add_generation_prompt": True}) == "<s><|user|>hi\n"
    assert text(chat_template_kwargs={"continue_final_message": True}) == rendered("hi")
    with pytest.raises(ValueError, match="chat_template_kwargs cannot set tokenize"):
        text(chat_template_kwargs={"tokenize": True})
    template = "{{ tools }}|{{ foo }}|{{ messages[0].content }}"
    assert text(chat_template=template, chat_template_kwargs={"tools": [{"a": 1}], "foo": "F"}) == "[{'a': 1}]|F|hi"
    assert text(chat_template=template, tools=[{"b": 2}], chat_template_kwargs={"tools": [{"a": 1}]}) == "[{'b': 2}]||hi"
    assert text(chat_template=None, chat_template_kwargs={"chat_template": template}) == "None||hi"
    assert text(chat_template_kwargs={"chat_template": template}) == rendered("hi")
    # Found by a hunt: tools or a key the template never reads changed nothing, without a word.
    with pytest.raises(FieldError, match="the chat template does not read tools, so it would change nothing; "
                                         "the template reads add_generation_prompt, bos_token, messages") as error:
        text(tools=[{"b": 2}])
    assert error.value.field == "tools" and text(tools=[]) == rendered("hi")
    with pytest.raises(FieldError, match="does not read enable_thinking, tools") as error:
        text(chat_template_kwargs={"enable_thinking": False, "tools": [{"a": 1}]})
    assert error.value.field == "chat_template_kwargs"
    assert text(chat_template="{% if enable_thinking is defined %}T{% endif %}{{ messages[0].content }}",
                chat_template_kwargs={"enable_thinking": False}) == "Thi"
    # Found by a hunt: a key that is no template variable's name was Python's "keywords must be
    # strings" under "messages".
    with pytest.raises(FieldError, match="chat_template_kwargs' keys must be strings") as error:
        text(chat_template_kwargs={1: True})
    assert error.value.field == "chat_template_kwargs"


def test_the_llms_own_chat_template_wins_over_a_chat_template_kwargs_key(llama_dir):
    """Found by a hunt: LLM(chat_template=...) replaced the tokenizer's, and a chat_template_kwargs
    key then won over it; in vLLM 0.32 the LLM's template is the call's chat_template default
    (ChatParams), which wins over the key, as a call's own template does."""
    own = "{% for m in messages %}OWN[{{ m.content }}]{% endfor %}"
    other = "{% for m in messages %}KWARG[{{ m.content }}]{% endfor %}"
    llm = LLM(llama_dir, chat_template=own)
    assert llm.chat(user("hi"), exact(1), use_tqdm=False,
                    chat_template_kwargs={"chat_template": other})[0].prompt == "OWN[hi]"
    assert llm.chat(user("hi"), exact(1), use_tqdm=False, chat_template=other)[0].prompt == "KWARG[hi]"


def test_a_content_format_other_than_the_templates_is_used_with_vllms_warning(caplog):
    """Found by a hunt: a chat_template_content_format that the template does not read loses the
    messages' text from the prompt without a word; vLLM warns (its detection may miss a template's
    reading, so the format given is still used)."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    template = PARTS + "{# once per template and format #}"
    with caplog.at_level("WARNING", logger="pagedlm"):
        assert render_chat(tokenizer, user("hi"), template, chat_template_content_format="string").text == "user:hi|"
    assert "chat_template_content_format 'string' is not the format detected from the chat template ('openai')" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pagedlm"):
        render_chat(tokenizer, user("hi"), template, chat_template_content_format="openai")
    assert "chat_template_content_format" not in caplog.text


def test_closing_early_aborts_what_is_in_flight(llm):
    params = [exact(1)] + [exact(40)] * 3
    with closing(llm.generate_as_completed(PROMPTS[:4], params)) as results:
        for index, _ in results:
            break
        assert index == 0 and llm.llm_engine.has_unfinished_requests()
        results.close()
        assert not llm.llm_engine.has_unfinished_requests()
    # The same without a reference: the abandoned generator is closed when it is dropped.
    assert next(iter(llm.generate_as_completed(PROMPTS[:4], params)))[0] == 0
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(token_ids(llm.generate(PROMPTS[1], exact(5), use_tqdm=False))[0]) == 5


def test_one_iteration_at_a_time(llm):
    with closing(llm.generate_as_completed(PROMPTS[:3], [exact(1), exact(3), exact(5)])) as first:
        assert next(first)[0] == 0
        with pytest.raises(RuntimeError, match="already running"):
            next(llm.generate_as_completed(["Hello"], exact(1)))
        with pytest.raises(RuntimeError, match="already running"):
            llm.generate("Hello", exact(1), use_tqdm=False)
        with pytest.raises(RuntimeError, match="already running"):
            llm.chat(user("Hello"), exact(1), use_tqdm=False, chat_template=TEMPLATE)
        assert next(first)[0] == 1  # the refused calls left the open iteration alone
    assert [i for i, _ in llm.generate_as_completed(["Hello"], exact(1))] == [0]


def test_per_prompt_params_as_an_iterable_with_none_for_the_defaults(llm):
    prompts = PROMPTS[:3]
    params = iter([exact(2), None, exact(5)])
    results = dict(llm.generate_as_completed(iter(prompts), params))
    assert sorted(results) == [0, 1, 2]
    assert [len(results[i].outputs[0].token_ids) for i in (0, 2)] == [2, 5]
    default = llm.generate(prompts[1], use_tqdm=False)[0].outputs[0].token_ids
    assert results[1].outputs[0].token_ids == default
    assert default == token_ids(llm.generate(prompts[1], SamplingParams(temperature=0, max_tokens=DEFAULT_MAX_TOKENS),
                                             use_tqdm=False))[0]


def test_use_tqdm_takes_a_callable_that_makes_the_bar(llm):
    import io

    from tqdm import tqdm

    bars = []

    def make_bar(**kwargs):
        bars.append(tqdm(**kwargs, file=io.StringIO()))
        return bars[-1]

    llm.generate(PROMPTS[:2], exact(2), use_tqdm=make_bar)
    llm.chat(user("Hi"), exact(2), use_tqdm=make_bar, chat_template=TEMPLATE)
    assert [(bar.n, bar.total) for bar in bars] == [(2, 2), (1, 1)]


def test_a_use_tqdm_callable_gets_vllms_keywords_only(llm):
    """Found by a hunt: pagedlm passed ``disable=``, which vLLM never does, so a callable taking
    exactly vLLM's keywords raised TypeError."""
    import io

    from tqdm import tqdm

    bars = []

    def make_bar(total, desc, dynamic_ncols, postfix=None):
        bars.append(tqdm(total=total, desc=desc, dynamic_ncols=dynamic_ncols, postfix=postfix, file=io.StringIO()))
        return bars[-1]

    llm.generate(PROMPTS[:2], exact(2), use_tqdm=make_bar)
    ids = llm.enqueue(PROMPTS[:1], exact(2), use_tqdm=make_bar)
    assert len(llm.wait_for_completion(use_tqdm=make_bar)) == len(ids)
    assert [(bar.desc, bar.n, bar.total) for bar in bars] == [
        ("Processed prompts", 2, 2), ("Rendering prompts", 1, 1), ("Processed prompts", 1, 1)]
