import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxopt import registry
from onnxopt.errors import InputError
from onnxopt.passes.base import Pass, PassResult
from onnxopt.pipeline import PipelineError, Step, convert_value, describe_options, format_pipeline, parse_pipeline


@dataclass(frozen=True)
class _Options:
    ratio: float = 0.5
    steps: int = 3
    flag: bool = True
    method: str = "l2"
    names: tuple[str, ...] = ()
    limit: float | None = None

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise InputError(f"ratio must be in [0, 1), got {self.ratio}")


class _Typed(Pass):
    name = "typed-test"
    summary = "a pass with one option of each type, for parser tests"
    Options = _Options

    def run(self, model):
        return PassResult(model, False)


@pytest.fixture(autouse=True)
def typed_pass(monkeypatch):
    monkeypatch.setitem(registry.PASSES, _Typed.name, _Typed)


def test_parse_typed_options_and_defaults():
    steps = parse_pipeline('dce, typed-test(ratio=0.25, steps=7, flag=false, names=a|b.c, limit=none), lift-constants')
    assert [s.name for s in steps] == ["dce", "typed-test", "lift-constants"]
    assert steps[1].options == _Options(ratio=0.25, steps=7, flag=False, names=("a", "b.c"), limit=None)


def test_format_spells_out_every_default_and_parses_back():
    steps = parse_pipeline("typed-test,dce")
    text = format_pipeline(steps)
    assert text == 'typed-test(ratio=0.5,steps=3,flag=true,method=l2,names="",limit=none),dce'
    assert parse_pipeline(text) == steps


def test_quoted_values_keep_commas():
    steps = parse_pipeline('typed-test(method="a,b (c)")')
    assert steps[0].options.method == "a,b (c)"
    assert parse_pipeline(format_pipeline(steps)) == steps


@pytest.mark.parametrize(
    "text, column, fragment",
    [
        ("dcee", 1, "unknown pass 'dcee' (did you mean 'dce'?)"),
        ("dce,typed-test(ratoi=0.1)", 16, "has no option 'ratoi' (did you mean 'ratio'?)"),
        ("typed-test(steps=2.5)", 18, "expected a whole number, got '2.5'"),
        ("typed-test(flag=maybe)", 17, "expected true or false"),
        ("typed-test(ratio=1.5)", 1, "ratio must be in [0, 1)"),
        ("typed-test(ratio=0.1", 21, "expected ',' or ')' at the end"),
        ("dce dce", 5, "expected ',' between steps"),
        ("", 1, "the pipeline is empty"),
        ("typed-test(steps=1,steps=2)", 20, "given twice"),
    ],
)
def test_errors_name_the_column(text, column, fragment):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert info.value.column + 1 == column
    assert fragment in str(info.value)
    assert isinstance(info.value, InputError)


def test_describe_options_lists_types_and_defaults():
    rows = dict((n, (t, d)) for n, t, d in describe_options(_Options))
    assert rows["names"] == ("list of str (a|b)", '""')
    assert rows["limit"] == ("float | None", "none")


def test_convert_value_rejects_bad_numbers():
    with pytest.raises(ValueError):
        convert_value("x", float)


word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-:*", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    ratio=st.floats(0, 0.999, allow_nan=False),
    steps=st.integers(-10**6, 10**6),
    flag=st.booleans(),
    method=st.text(min_size=0, max_size=10).filter(lambda s: '"' not in s and "|" not in s),
    names=st.lists(word, max_size=3).map(tuple),
    limit=st.none() | st.floats(-1e6, 1e6, allow_nan=False),
)
def test_pipelines_round_trip(ratio, steps, flag, method, names, limit):
    step = Step("typed-test", _Options(ratio, steps, flag, method, names, limit))
    pipeline = [step, Step("dce", registry.PASSES["dce"].Options())]
    assert parse_pipeline(format_pipeline(pipeline)) == pipeline
    assert dataclasses.asdict(parse_pipeline(format_pipeline(pipeline))[0].options) == dataclasses.asdict(step.options)


def test_preset_stands_for_its_steps():
    from onnxopt.registry import PRESETS

    assert parse_pipeline("cleanup,dce") == parse_pipeline(PRESETS["cleanup"] + ",dce")
    with pytest.raises(PipelineError, match="preset 'cleanup' takes no options"):
        parse_pipeline("cleanup(max_bytes=1)")
    with pytest.raises(PipelineError, match="did you mean 'cleanup'"):
        parse_pipeline("cleanp")
