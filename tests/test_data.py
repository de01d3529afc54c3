import json

import numpy as np
import pytest

from edgetune import data
from edgetune.errors import DataError
from edgetune.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok(tiny_bundle):
    return ChatTokenizer.from_dir(tiny_bundle)


def write(tmp_path, lines, name="train.jsonl"):
    p = tmp_path / name
    p.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return p


def test_chat_template_matches_transformers(tok, tiny_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "category: billing"}]
    assert tok.render(msgs) == hf.apply_chat_template(msgs, tokenize=False)
    assert tok.render(msgs[:1], True) == hf.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert tok.encode(tok.render(msgs)) == hf(tok.render(msgs), add_special_tokens=False)["input_ids"]


def test_chat_masks_everything_but_the_assistant(tok, tmp_path):
    p = write(tmp_path, [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "category: billing"}]}])
    ds = data.load_dataset(p, tok, 128)
    e = ds.examples[0]
    labelled_ids = e.ids[1:][e.targets[:-1] != data.IGNORE]
    assert tok.decode(labelled_ids, skip_special=False).startswith("category: billing<|im_end|>")
    assert ds.fmt == "chat"


def test_no_mask_prompt_labels_all(tok, tmp_path):
    p = write(tmp_path, [{"prompt": "hello", "completion": "world"}])
    ds = data.load_dataset(p, tok, 128, mask_prompt=False)
    assert ds.examples[0].n_labels == len(ds.examples[0].ids) - 1


@pytest.mark.parametrize("rec,fmt", [
    ({"prompt": "a", "completion": "b"}, "completion"),
    ({"text": "hello world"}, "text"),
    ({"text": "my invoice is wrong", "label": "billing"}, "classification"),
])
def test_formats_detected_from_keys(tok, tmp_path, rec, fmt):
    assert data.load_dataset(write(tmp_path, [rec]), tok, 128).fmt == fmt


def test_malformed_line_names_file_and_line(tok, tmp_path):
    p = write(tmp_path, [{"text": "ok"}, "", '{"text": "broken"'])
    with pytest.raises(DataError) as e:
        data.load_dataset(p, tok, 128)
    assert str(e.value).startswith(f"{p}:3: malformed JSON")


def test_unknown_format_names_line(tok, tmp_path):
    p = write(tmp_path, [{"question": "a"}])
    with pytest.raises(DataError, match=f"{p}:1: cannot tell the format"):
        data.load_dataset(p, tok, 128)


def test_missing_and_empty_files(tok, tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        data.load_dataset(tmp_path / "nope.jsonl", tok, 128)
    with pytest.raises(DataError, match="has no records"):
        data.load_dataset(write(tmp_path, []), tok, 128)
    with pytest.raises(DataError, match="data not found"):
        data.resolve_split(tmp_path / "nothing")


def test_record_truncated_to_nothing_is_an_error(tok, tmp_path):
    p = write(tmp_path, [{"prompt": "the quick brown fox " * 10, "completion": "yes"}])
    with pytest.raises(DataError, match=f"{p}:1: no labelled tokens left after truncation to 16 tokens"):
        data.load_dataset(p, tok, 16)


def test_truncation_is_counted(tok, tmp_path):
    p = write(tmp_path, [{"text": "the quick brown fox " * 10}, {"text": "hi"}])
    ds = data.load_dataset(p, tok, 16)
    assert ds.truncated == 1 and max(len(e.ids) for e in ds.examples) == 16


def test_batches_are_deterministic_padded_and_bucketed(tok, chat_data):
    ds = data.load_dataset(chat_data / "train.jsonl", tok, 128)
    a = data.epoch_batches(ds, 4, seed=1, epoch=0, pad_id=tok.pad_id)
    b = data.epoch_batches(ds, 4, seed=1, epoch=0, pad_id=tok.pad_id)
    c = data.epoch_batches(ds, 4, seed=1, epoch=1, pad_id=tok.pad_id)
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert not all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    for batch in a:
        assert batch.input_ids.shape[1] % 8 == 0
        assert (batch.labels[batch.attention_mask == 0] == data.IGNORE).all()
    assert sum(x.input_ids.shape[0] for x in a) == len(ds)


def test_sample_dataset_is_valid(tok):
    from conftest import SAMPLE_DATA

    for split in ("train", "valid", "test"):
        ds = data.load_dataset(SAMPLE_DATA / f"{split}.jsonl", tok, 512)
        assert ds.fmt == "chat" and ds.truncated == 0
