import pytest

from pagedlm import SamplingParams

BAD = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
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
