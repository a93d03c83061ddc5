import pickle

import numpy as np
import pytest

from pagedlm import BeamSearchParams, SamplingParams

BAD = [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 2.5), ("min_p", -0.1), ("min_p", 1.1),
    ("seed", 1.5), ("seed", True), ("max_tokens", 0), ("max_tokens", 3.0), ("min_tokens", -1),
    ("ignore_eos", 1), ("stop_token_ids", [-1]), ("stop_token_ids", "2"), ("stop_token_ids", [True]),
    ("skip_special_tokens", "yes"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_hf_style_off_values_are_accepted():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=0, top_p=1.0, min_p=0.0).top_k == 0
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams().max_tokens is None
    assert SamplingParams(seed=-1).seed is None  # vLLM's "no seed"


@pytest.mark.parametrize("kwargs,field", [
    (dict(seed=2**64), "seed"),
    (dict(top_k=2**63), "top_k"),
    (dict(max_tokens=2**63), "max_tokens"),
    (dict(temperature=1e39), "temperature"),
    (dict(top_p=1e-46), "top_p"),  # 0 in float32, where the sampler computes
    (dict(repetition_penalty=1e-46), "repetition_penalty"),
    (dict(presence_penalty=np.bool_(True)), "presence_penalty"),
    (dict(stop_token_ids=[np.int64(5), -1]), "stop_token_ids"),
    (dict(n=2, use_beam_search=True, temperature=0, early_stopping=1), "early_stopping"),
])
def test_values_outside_what_the_engine_stores_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_numbers_of_other_types_are_stored_as_python_numbers():
    p = SamplingParams(presence_penalty=np.float64(0.5), frequency_penalty=np.float32(0.25), top_k=np.int64(5),
                       repetition_penalty=2**64, stop_token_ids=[np.int64(3)], seed=np.int32(7))
    assert [type(v) for v in (p.presence_penalty, p.frequency_penalty, p.repetition_penalty)] == [float] * 3
    assert [type(v) for v in (p.top_k, p.stop_token_ids[0], p.seed)] == [int] * 3
    beams = SamplingParams(n=2, use_beam_search=True, temperature=0, early_stopping=np.True_)
    assert beams.early_stopping is True


@pytest.mark.parametrize("field,value", BAD + [
    ("n", 0), ("stop", ""), ("stop", ["ok", 3]), ("output_kind", "delta"), ("logits_processors", [lambda: 0]),
])
def test_clone_checks_a_field_set_after_construction(field, value):
    params = SamplingParams()
    setattr(params, field, value)
    with pytest.raises(ValueError, match=field):
        params.clone()


def test_clone_normalises_as_the_constructor_does():
    params = SamplingParams()
    params.stop, params.top_k, params.stop_token_ids = "end", -1, (3, np.int64(4))
    copy = params.clone()
    assert (copy.stop, copy.top_k, copy.stop_token_ids) == (["end"], 0, [3, 4])
    assert copy.stop is not params.stop and params.stop == "end"


def test_greedy_params_and_repeated_ids_normalise_as_vllms():
    """Found by a hunt against vLLM 0.32's SamplingParams.__post_init__: temperature 0 resets top_p,
    top_k and min_p (greedy takes the top token whatever they say), and stop_token_ids and bad_words
    keep each entry once, so such params compare equal to the plain ones."""
    greedy = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0) and greedy == SamplingParams(temperature=0)
    sampled = SamplingParams(temperature=0.5, top_k=5, top_p=0.5, min_p=0.2)
    assert (sampled.top_p, sampled.top_k, sampled.min_p) == (0.5, 5, 0.2)
    repeated = SamplingParams(stop_token_ids=[5, 3, 5], bad_words=["b", "a", "b"])
    assert (repeated.stop_token_ids, repeated.bad_words) == ([5, 3], ["b", "a"])


def test_a_best_of_never_given_follows_n_in_a_clone_and_otherwise_stays():
    params = SamplingParams(temperature=0.8)
    params.n = 3
    assert params.clone().best_of == 3
    params.n = 1  # one completion, not the best of 3: as SamplingParams(n=1, ...)
    assert params.clone().best_of == 1
    assert SamplingParams(n=2, temperature=0.8).clone(n=3).best_of == 3
    assert SamplingParams(n=4, temperature=0.8).clone(n=1).best_of == 1
    beams = SamplingParams(n=2, use_beam_search=True, temperature=0)
    beams.n = 1
    with pytest.raises(ValueError, match="beam width above 1"):
        beams.clone()
    given = SamplingParams(n=2, best_of=4, temperature=0.8)
    given.n = 3
    assert given.clone().best_of == 4
    later = SamplingParams(n=2, temperature=0.8)
    later.n, later.best_of = 1, 2  # given after construction, equal to what n gave
    assert later.clone().best_of == 2
    with pytest.raises(ValueError, match="best_of must be >= n"):
        given.clone(n=5)


def test_an_attribute_that_is_no_field_is_refused():
    """vLLM's older name, or a misspelt field, set after construction would be kept where nothing
    reads it."""
    from pagedlm import StructuredOutputsParams

    params = SamplingParams(max_tokens=3)
    with pytest.raises(AttributeError, match="SamplingParams has no field 'guided_decoding'; its fields are n, "):
        params.guided_decoding = {"regex": "a+"}
    with pytest.raises(AttributeError, match="no field 'max_token'"):
        params.max_token = 4
    constraint = StructuredOutputsParams(regex="a+")
    with pytest.raises(AttributeError, match="StructuredOutputsParams has no field 'whitespace'"):
        constraint.whitespace = r"\s*"
    params.max_tokens, constraint.regex = 4, "b+"  # fields are fine
    assert params.clone(structured_outputs=constraint).structured_outputs.regex == "b+"


def test_vllm_s_structured_outputs_fields_at_their_defaults():
    """Found by a hunt: vLLM 0.32's whitespace_pattern and structural_tag were refused at their
    default None too (a dict of vLLM's fields, as a job row carries it); another value is refused,
    also when set after construction (the request's copy checks it)."""
    from pagedlm import StructuredOutputsParams

    assert StructuredOutputsParams(json={"type": "object"}, whitespace_pattern=None, structural_tag=None).json
    fields = {"choice": ["a", "b"], "whitespace_pattern": None, "structural_tag": None}
    assert SamplingParams(structured_outputs=fields).structured_outputs.choice == ["a", "b"]
    with pytest.raises(ValueError, match="whitespace_pattern must be None: .*disable_any_whitespace=True"):
        StructuredOutputsParams(json={"type": "object"}, whitespace_pattern=r"[ ]?")
    with pytest.raises(ValueError, match="structural_tag must be None: structural tags are not supported"):
        StructuredOutputsParams(structural_tag='{"type": "structural_tag"}')
    constraint = StructuredOutputsParams(regex="a+")
    constraint.whitespace_pattern = r"\s*"
    with pytest.raises(ValueError, match="whitespace_pattern must be None"):
        SamplingParams(structured_outputs=constraint).clone()


@pytest.mark.parametrize("field,value,message", [
    ("regex", None, "exactly one of"), ("json", {"type": "object"}, "exactly one of"),
    ("choice", "yes", r"structured_outputs.choice must be a non-empty list"),
    ("regex", 5, r"structured_outputs.regex must be a str"),
])
def test_clone_checks_structured_outputs_changed_after_construction(field, value, message):
    from pagedlm import StructuredOutputsParams

    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    if field == "choice":
        params.structured_outputs.regex = None
    setattr(params.structured_outputs, field, value)
    with pytest.raises(ValueError, match=message):
        params.clone()
    ok = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert ok.clone().structured_outputs == ok.structured_outputs
    assert ok.clone().structured_outputs is not ok.structured_outputs


@pytest.mark.parametrize("field,value", [
    ("beam_width", 0), ("beam_width", 2.0), ("beam_width", True), ("max_tokens", 0), ("max_tokens", None),
    ("temperature", 0.7), ("temperature", "0"), ("length_penalty", "1"), ("ignore_eos", 1), ("skip_special_tokens", "no"),
    ("include_stop_str_in_output", True), ("include_stop_str_in_output", 0), ("structured_outputs", {"choice": []}),
    ("watermarking", True), ("watermarking", 0),
])
def test_beam_search_params_name_the_bad_field(field, value):
    kwargs = {"beam_width": 2, "max_tokens": 8, field: value}
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**kwargs)


def test_sampling_params_take_vllms_watermarking_at_its_no_op_values():
    """vLLM 0.32's field, which its own beam search passes (found by an examples hunt: a TypeError)."""
    assert SamplingParams(watermarking=False) == SamplingParams(watermarking=False).clone()
    for value in (True, 1, "no"):
        with pytest.raises(ValueError, match="watermarking"):
            SamplingParams(watermarking=value)


def test_vllm_0_32_scoring_replay_and_streaming_fields_are_checked():
    """vLLM 0.32's ``prompt_logprob_token_ids`` (an integer array or ragged lists, padded with -1,
    kept as a tuple of equal tuples), ``prompt_logprob_start``, ``trace_decode_token_ids`` with
    vLLM's conflicts, ``stream_interval`` and ``routed_experts_prompt_start`` (0 only)."""
    params = SamplingParams(prompt_logprob_token_ids=np.array([[3, 4], [5, -1]], dtype=np.int16), prompt_logprob_start=2)
    assert params.prompt_logprob_token_ids == ((3, 4), (5, -1)) and params.prompt_logprob_start == 2
    assert SamplingParams(prompt_logprob_token_ids=[[7], [], [1, 2, 3]]).prompt_logprob_token_ids == (
        (7, -1, -1), (-1, -1, -1), (1, 2, 3))
    assert params.clone() == params and not params.reads_prefix_cache
    assert params.clone().prompt_logprob_token_ids is params.prompt_logprob_token_ids  # checked once, shared
    assert SamplingParams(trace_decode_token_ids=(4, 5)).trace_decode_token_ids == [4, 5]
    assert SamplingParams(stream_interval=3, routed_experts_prompt_start=0).stream_interval == 3
    for fields, message in [
        ({"prompt_logprob_token_ids": [[1, -2]]}, r"prompt_logprob_token_ids must be token ids \(-1 pads a row\)"),
        ({"prompt_logprob_token_ids": np.array([[1, -2]])}, r"must be token ids \(-1 pads a row\), got -2 to 1"),
        ({"prompt_logprob_token_ids": np.zeros((2, 0), dtype=np.int32)}, "must be a non-empty integer array"),
        ({"prompt_logprob_token_ids": [[]]}, "at least one row with at least one token id"),
        ({"prompt_logprob_token_ids": []}, "at least one row with at least one token id"),
        ({"prompt_logprob_token_ids": [1, 2]}, "must be an integer array .* or a list of lists of token ids"),
        ({"prompt_logprob_token_ids": [[1], None]}, "got a list whose row 1 is NoneType"),
        ({"prompt_logprob_token_ids": np.zeros(3, dtype=np.int64)}, r"got a int64 array of shape \[3\]"),
        ({"prompt_logprob_token_ids": np.zeros((2, 2))}, r"got a float64 array of shape \[2, 2\]"),
        ({"prompt_logprob_token_ids": [[1.5]]}, "prompt_logprob_token_ids must be an int"),
        ({"prompt_logprob_start": 1}, "prompt_logprob_start needs prompt_logprob_token_ids"),
        ({"prompt_logprob_token_ids": [[1]], "prompt_logprob_start": -1}, "prompt_logprob_start must be None or >= 0"),
        ({"prompt_logprob_token_ids": [[1]], "skip_reading_prefix_cache": False},
         "skip_reading_prefix_cache=False cannot be set with prompt_logprob_token_ids"),
        ({"trace_decode_token_ids": []}, "trace_decode_token_ids must be None or a non-empty list"),
        ({"trace_decode_token_ids": [1, -1]}, "trace_decode_token_ids must be a list of non-negative ints"),
        ({"trace_decode_token_ids": [1], "n": 2, "temperature": 1}, r"trace_decode_token_ids needs n=1 \(one completion replays the trace\), got n=2"),
        ({"trace_decode_token_ids": [1], "best_of": 2, "temperature": 1}, "got best_of=2"),
        ({"trace_decode_token_ids": [1], "prompt_logprobs": 0}, "not supported with prompt_logprobs"),
        ({"trace_decode_token_ids": [1], "bad_words": ["x"]}, "not supported with bad_words"),
        ({"trace_decode_token_ids": [1], "structured_outputs": {"regex": "a"}}, "not supported with structured_outputs"),
        ({"trace_decode_token_ids": [1], "thinking_token_budget": 3}, "not supported with thinking_token_budget"),
        ({"stream_interval": 0}, "stream_interval must be None or at least 1, got 0"),
        ({"stream_interval": True}, "stream_interval must be an int"),
        ({"routed_experts_prompt_start": 3}, "routed_experts_prompt_start must be 0, got 3: .*mixture-of-experts"),
    ]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**fields)


def test_beam_search_params_take_vllms_fields_at_their_defaults():
    """A vLLM script passing them as they are (found by a docs hunt: a bare TypeError)."""
    for watermarking in (None, False):  # None: the engine's watermark, of which pagedlm has none
        params = BeamSearchParams(beam_width=2, max_tokens=4, include_stop_str_in_output=False, structured_outputs=None,
                                  watermarking=watermarking)
        assert params.sampling_params(100) == BeamSearchParams(beam_width=2, max_tokens=4).sampling_params(100)


def test_beam_search_params_run_as_beams_with_their_logprobs():
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True, length_penalty=0.5).sampling_params(100)
    assert (params.use_beam_search, params.n, params.best_of, params.max_tokens) == (True, 3, 3, 5)
    assert (params.ignore_eos, params.length_penalty, params.logprobs, params.detokenize) == (True, 0.5, 6, False)
    greedy = BeamSearchParams(beam_width=1, max_tokens=5).sampling_params(4)
    assert not greedy.use_beam_search and greedy.greedy and greedy.logprobs == 2


def _repeats_as_vllm_checks(tokens: list[int], lo: int, hi: int, count: int) -> bool:
    """vLLM's ``check_sequence_repetition``, position by position."""
    for size in range(max(lo, 1), hi + 1):
        if size * count > len(tokens):
            return False
        if all(tokens[-n] == tokens[-(size * m + n)] for n in range(1, size + 1) for m in range(1, count)):
            return True
    return False


def test_repetition_detection_finds_what_vllm_finds_and_names_bad_values():
    from pagedlm.sampling_params import RepetitionDetectionParams

    rng = np.random.default_rng(0)
    for _ in range(3000):
        tokens = rng.integers(0, 3, size=int(rng.integers(0, 14))).tolist()
        hi = int(rng.integers(0, 5))
        lo, count = int(rng.integers(0, hi + 1)), int(rng.integers(2, 5))
        assert RepetitionDetectionParams(hi, lo, count).detects(tokens) == _repeats_as_vllm_checks(tokens, lo, hi, count)
    params = SamplingParams(repetition_detection={"max_pattern_size": 3, "min_count": 2})
    assert params.repetition_detection == RepetitionDetectionParams(max_pattern_size=3, min_count=2)
    for bad, message in [({"max_pattern_size": 2}, "min_count must be >= 2 with max_pattern_size > 0, got 0"),
                         ({"max_pattern_size": 2, "min_pattern_size": 3, "min_count": 2}, "min_pattern_size <= max"),
                         ({"max_pattern_size": -1}, "must be >= 0"), ({"count": 2}, "unknown field.*count"),
                         ({"max_pattern_size": 2.0, "min_count": 2}, "max_pattern_size must be an int"),
                         (3, "RepetitionDetectionParams \\(or a dict of its fields\\), got int")]:
        with pytest.raises(ValueError, match=f"repetition_detection.*{message}"):
            SamplingParams(repetition_detection=bad)
    with pytest.raises(ValueError, match="repetition_detection is not supported with use_beam_search"):
        SamplingParams(n=2, temperature=0, use_beam_search=True, repetition_detection={"max_pattern_size": 1, "min_count": 2})


def test_extra_args_are_kept_and_cloned_deeply_unless_skip_clone():
    args = {"scorer": {"weights": [1, 2]}}
    params = SamplingParams(extra_args=args)
    clone = params.clone()
    assert clone.extra_args == args and clone.extra_args["scorer"] is not args["scorer"]
    assert SamplingParams(extra_args=args, skip_clone=True).clone().extra_args is args
    with pytest.raises(ValueError, match="extra_args must be None or a dict, got list"):
        SamplingParams(extra_args=[1])
    with pytest.raises(ValueError, match="skip_clone must be a bool"):
        SamplingParams(skip_clone="yes")


def test_logprob_token_ids_are_checked_as_vllm_checks_them():
    assert SamplingParams(logprob_token_ids=(np.int64(3), 5)).logprob_token_ids == [3, 5]
    assert SamplingParams(logprob_token_ids=[3, 5]).num_logprobs == 2 and SamplingParams().num_logprobs is None
    assert SamplingParams(logprobs=2, logprob_token_ids=[3, 5]).num_logprobs == 2
    for bad, message in [([], "1 to 128 distinct token ids, got 0"), (list(range(129)), "got 129"),
                         ([3, 3], r"got 2 \(1 distinct\)"), ([-1], "non-negative ints"), (5, "a list of")]:
        with pytest.raises(ValueError, match=f"logprob_token_ids must .*{message}"):
            SamplingParams(logprob_token_ids=bad)
    with pytest.raises(ValueError, match=r"logprobs must equal len\(logprob_token_ids\).*logprobs=1 and 2 ids"):
        SamplingParams(logprobs=1, logprob_token_ids=[3, 5])
    with pytest.raises(ValueError, match="logprob_token_ids is not supported with use_beam_search"):
        SamplingParams(n=2, temperature=0, use_beam_search=True, logprob_token_ids=[3])


def test_checked_bias_and_allowed_ids_are_shared_read_only_by_copies():
    """Found by a soak hunt: each request's copy checked a vocabulary-wide logit_bias again (~70 ms a
    request) and kept a copy of its own. Now the checked dict and list are read-only and shared."""
    params = SamplingParams(logit_bias={str(i): -1 for i in range(1000)}, allowed_token_ids=list(range(1000)))
    copy_ = params.clone()
    assert copy_.logit_bias is params.logit_bias and copy_.allowed_token_ids is params.allowed_token_ids
    assert params.logit_bias == {i: -1.0 for i in range(1000)} and params.allowed_token_ids == list(range(1000))
    with pytest.raises(TypeError, match="assign a new value"):
        params.logit_bias[5] = 1.0
    with pytest.raises(TypeError, match="assign a new value"):
        params.allowed_token_ids.append(5)
    params.logit_bias = {5: "x"}  # a new value is checked again
    with pytest.raises(ValueError, match=r"logit_bias values \(biases\) must be a number"):
        params.clone()
    restored = pickle.loads(pickle.dumps(copy_))  # Ray ships params to its actors
    assert restored.logit_bias == copy_.logit_bias and restored.allowed_token_ids == copy_.allowed_token_ids


def test_a_best_of_never_given_follows_n_through_dataclasses_replace():
    """Found by a differential against vLLM: replace(SamplingParams(n=3), n=1) kept best_of 3, so
    one completion came as the best of three samples (and replace(SamplingParams(), n=3) was refused)."""
    from dataclasses import replace

    assert replace(SamplingParams(n=3, temperature=0.8), n=1).best_of == 1
    assert replace(SamplingParams(temperature=0.8), n=3).best_of == 3
    assert replace(SamplingParams(n=3, temperature=0.8), n=1, temperature=0).best_of == 1
    assert replace(SamplingParams(n=2, best_of=4, temperature=0.8), n=1).best_of == 4  # given: it stays
    assert replace(pickle.loads(pickle.dumps(SamplingParams(n=3, temperature=0.8))), n=2).best_of == 2
    assert SamplingParams(n=3).best_of_field == "n" and SamplingParams(best_of=3).best_of_field == "best_of"


@pytest.mark.parametrize("fields,message", [
    ({"n": 16385}, r"n must be in \[1, 16384\]"), ({"best_of": 16385}, "best_of must be >= n and at most 16384"),
    ({"logit_bias": {"\u00b2": 1.0}}, r"logit_bias keys \(token ids\) must be an int, got '\u00b2'"),
    ({"top_p": 1e-46}, r"got 1e-46 \(0 in float32"), ({"repetition_penalty": 1e-46}, r"got 1e-46 \(0 in float32"),
    ({"structured_outputs": {"grammar": " "}}, "structured_outputs.grammar must be a non-empty str"),
    ({"logit_bias": {5: 3e38}}, r"logit_bias values must be within \+-1e\+30, got 3e\+38 for token 5"),  # a review
])
def test_refusals_found_by_a_differential_against_vllm(fields, message):
    """n: vLLM's limit (an n of 10**9 was taken and spent minutes making child requests); '\u00b2'
    passed str.isdigit and failed int() without naming the field; the float32 underflows said
    'must be in (0, 1], got 1e-46'."""
    with pytest.raises(ValueError, match=message) as info:
        SamplingParams(**fields)
    assert info.value.field == next(iter(fields))


def test_values_vllm_takes_and_honours():
    """logit_bias as given (vLLM's LLM adds it unclamped; only its OpenAI server clamps); logprobs
    True as 1; an empty regex or an empty choice (the empty completion, which vLLM takes on purpose)."""
    from pagedlm import StructuredOutputsParams

    assert SamplingParams(logit_bias={5: 500, 6: -1e4}).logit_bias == {5: 500.0, 6: -1e4}
    assert (SamplingParams(logprobs=True).logprobs, SamplingParams(prompt_logprobs=True).prompt_logprobs) == (1, 1)
    assert StructuredOutputsParams(regex="").regex == "" and StructuredOutputsParams(choice=["", "a"]).choice == ["", "a"]
