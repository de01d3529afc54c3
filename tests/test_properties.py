"""Property-based tests of the readers that take user files: the JSONL reader and the config
resolver never crash on any input, and every error names the file (and line)."""
from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetune.device import data
from edgetune.formats import config
from edgetune.formats.errors import EdgetuneError

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_subnormal=False) | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                    max_leaves=12)
RECORD = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=40)}),
    st.fixed_dictionaries({"text": st.text(max_size=40), "label": st.one_of(st.text(max_size=10), st.integers(), JSON)}),
    st.fixed_dictionaries({"prompt": JSON, "completion": JSON}),
    st.fixed_dictionaries({"messages": st.one_of(JSON, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "robot"]), "content": JSON}), max_size=4))}),
    st.dictionaries(st.text(max_size=10), JSON, max_size=4),
)
LINE = st.one_of(RECORD.map(json.dumps), JSON.map(json.dumps), st.text(max_size=30),
                 st.binary(max_size=30).map(lambda b: b.decode("latin-1")))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(lines=st.lists(LINE, max_size=6), raw_tail=st.binary(max_size=12))
def test_jsonl_reader_yields_objects_or_names_file_and_line(tmp_path_factory, lines, raw_tail):
    path = Path(tmp_path_factory.mktemp("j")) / "train.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw_tail)
    try:
        recs = list(data.read_jsonl(path))
    except EdgetuneError as e:
        assert str(path) in str(e)
        assert f"{path}:" in str(e) or "UTF-16" in str(e), str(e)  # a line number, or the whole file's encoding
        return
    for lineno, rec in recs:
        assert isinstance(rec, dict) and lineno >= 1


@SETTINGS
@given(records=st.lists(RECORD, min_size=1, max_size=5))
def test_records_become_examples_or_a_named_error(tmp_path_factory, tiny_tokenizer, records):
    path = Path(tmp_path_factory.mktemp("r")) / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    try:
        ds = data.load_dataset(path, tiny_tokenizer, 64)
    except EdgetuneError as e:
        assert str(path) in str(e), str(e)
        return
    assert len(ds) >= 0


@SETTINGS
@given(obj=st.one_of(JSON, st.dictionaries(st.sampled_from(
    ["lr", "steps", "batch_size", "rank", "targets", "epochs", "warmup", "seed", "schedule", "weight_decay",
     "max_seq_len", "truncate", "grad_accum", "device", "nope"]), JSON, max_size=5)))
def test_config_resolver_accepts_or_names_the_problem(tmp_path_factory, obj):
    path = Path(tmp_path_factory.mktemp("c")) / "cfg.json"
    path.write_text(json.dumps(obj))
    for cls in (config.TrainConfig, config.AdapterConfig):
        try:
            config.resolve(cls, path)
        except EdgetuneError as e:
            assert str(e).strip()
