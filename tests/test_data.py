import json

import numpy as np
import pytest

from edgetune.device import data
from edgetune.device.tokenizer import ChatTokenizer
from edgetune.formats.errors import DataError


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


def test_system_instruction_is_the_system_message_and_not_labelled(tok, tmp_path):
    sys_msg = "Answer with one of: billing, technical."
    recs = [{"system": sys_msg, "text": "my invoice is wrong", "label": "billing"},
            {"system": sys_msg, "question": "why?", "answer": "because"}]
    examples = [data.load_dataset(write(tmp_path, [r], f"{i}.jsonl"), tok, 256).examples[0] for i, r in enumerate(recs)]
    for e, answer in zip(examples, ["billing", "because"]):
        full = tok.decode(e.ids, skip_special=False)
        assert f"<|im_start|>system\n{sys_msg}<|im_end|>" in full
        labelled = tok.decode(e.ids[1:][e.targets[:-1] != data.IGNORE], skip_special=False)
        assert labelled.startswith(answer + "<|im_end|>") and sys_msg not in labelled
    bad = write(tmp_path, [{"system": ["x"], "text": "t", "label": "l"}])
    with pytest.raises(DataError, match=f"{bad}:1: 'system' must be a string"):
        data.load_dataset(bad, tok, 128)


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


def test_a_record_whose_answer_the_end_cut_removes_is_skipped_like_the_prompt_cut_skips(tok, tmp_path):
    short = {"prompt": "hi", "completion": "yes"}
    n = len(data.encode_record(tok, short, "completion", "x")[0]) + 2
    long_prompt = {"prompt": "the quick brown fox " * 10, "completion": "the lazy dog " * 3}
    p = write(tmp_path, [long_prompt, short])
    ds = data.load_dataset(p, tok, n, truncate="end")  # the cut takes every answer token
    assert len(ds) == 1 and ds.stats["skipped"] == 1 and ds.stats["skipped_records"] == [f"{p}:1"]
    assert ds.stats["end_cut"] == 0
    ds = data.load_dataset(p, tok, n, truncate="prompt")  # the answer alone does not fit
    assert len(ds) == 1 and ds.stats["skipped"] == 1 and ds.stats["skipped_records"] == [f"{p}:1"]
    with pytest.raises(DataError, match=f"{p}:1: .* tokens, more than --max-seq-len {n}"):
        data.load_dataset(p, tok, n, truncate="error")
    with pytest.raises(DataError, match=f"no records that fit in {n} tokens"):
        data.load_dataset(write(tmp_path, [long_prompt]), tok, n, truncate="end")


def test_a_token_straddling_the_prompt_answer_boundary_is_labelled(monkeypatch):
    """A tokenizer that merges the prompt's last character with the answer's first (offsets 4-6 over
    a boundary at 5): that token carries answer text and is trained; wholly-prompt ones are not."""
    full, spans = "abcdeXYZ", [(5, 8)]

    class Merging:
        def encode_offsets(self, text):
            return [1, 2, 3, 4], [(0, 2), (2, 4), (4, 6), (6, 8)]

    monkeypatch.setattr(data, "_chat_spans", lambda tok, msgs, where: (full, spans))
    ids, labelled = data._encode_messages(Merging(), [], "x", mask_prompt=True)
    assert labelled.tolist() == [False, False, True, True]


def _answer_ids(tok, ds_example):
    return ds_example.targets[ds_example.targets != data.IGNORE].tolist()


@pytest.mark.parametrize("extra", [-1, 0, 1, 40])
def test_prompt_side_is_cut_and_the_answer_kept(tok, tmp_path, extra):
    """Records just under, at and over the limit: the labelled tokens are exactly the answer's."""
    rec = {"text": "the package never arrived and the app crashes when I log in " * 3, "label": "shipping"}
    full, labelled = data.encode_record(tok, rec, "classification", "x")
    limit = len(full) - extra
    ds = data.load_dataset(write(tmp_path, [rec]), tok, limit)
    (ex,) = ds.examples
    assert len(ex.ids) <= limit
    want = data.shift_targets(full, labelled)
    assert _answer_ids(tok, ex) == want[want != data.IGNORE].tolist()
    assert ds.truncated == (1 if extra > 0 else 0) and ds.stats["prompt_cut"] == ds.truncated
    if extra > 0:  # the template's structure survives: the record still ends as the full one does
        assert ex.ids[-3:].tolist() == full[-3:].tolist()


def test_oldest_turns_are_dropped_first(tok, tmp_path):
    msgs = [{"role": "system", "content": "classify"}]
    for q, a in (("my invoice is wrong", "billing"), ("the package never arrived", "shipping"),
                 ("the app crashes when I log in", "technical")):
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    rec = {"messages": msgs}
    last = {"messages": [msgs[0], *msgs[-2:]]}
    limit = len(data.encode_record(tok, last, "chat", "x")[0]) + 2
    ds = data.load_dataset(write(tmp_path, [rec]), tok, limit)
    (ex,) = ds.examples
    assert ds.stats["turns_dropped"] == 1
    assert tok.decode(ex.ids.tolist()).startswith(tok.decode(data.encode_record(tok, last, "chat", "x")[0].tolist()))
    assert "invoice" not in tok.decode(ex.ids.tolist()) and "classify" in tok.decode(ex.ids.tolist())


def test_an_answer_longer_than_the_limit_is_skipped_or_refused(tok, tmp_path):
    long_answer = {"prompt": "hi", "completion": "the quick brown fox jumps over the lazy dog " * 4}
    short = {"prompt": "hi", "completion": "yes"}
    n = len(data.encode_record(tok, short, "completion", "x")[0]) + 2
    p = write(tmp_path, [long_answer, short])
    ds = data.load_dataset(p, tok, n)
    assert len(ds) == 1 and ds.stats["skipped"] == 1 and ds.stats["skipped_records"] == [f"{p}:1"]
    with pytest.raises(DataError, match=f"{p}:1: .* tokens, more than --max-seq-len {n}"):
        data.load_dataset(p, tok, n, truncate="error")
    with pytest.raises(DataError, match=f"no records that fit in {n} tokens"):
        data.load_dataset(write(tmp_path, [long_answer]), tok, n)


def test_truncation_strategies_are_checked(tok, tmp_path):
    with pytest.raises(DataError, match="truncate must be one of auto, prompt, end, error"):
        data.load_dataset(write(tmp_path, [{"text": "the quick brown fox " * 10}]), tok, 16, truncate="middle")


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


def test_a_prompt_longer_than_the_context_keeps_its_end():
    from edgetune.device.infer import fit_prompt

    ids = list(range(100))
    assert fit_prompt(ids, 256, 16) == ids
    assert fit_prompt(ids, 50, 10) == ids[60:]
    assert fit_prompt(ids, None, 10) == ids
    with pytest.raises(DataError, match="leaves no room for a prompt"):
        fit_prompt(ids, 50, 50)


def test_train_records_the_truncation(tiny_bundle, tmp_path):
    from edgetune.device import trainer

    recs = [{"text": "the package never arrived " * 8, "label": "shipping"}, {"text": "hi", "label": "billing"}] * 4
    d = tmp_path / "d"
    d.mkdir()
    write(d, recs)
    logs = []
    r = trainer.train(tiny_bundle, d, tmp_path / "run", steps=1, batch_size=4, max_seq_len=32, progress=False,
                      log=logs.append)
    run = json.loads((r.out / "run.json").read_text())
    assert run["data"]["truncation"]["prompt_cut"] == 4 and run["data"]["truncation"]["truncate"] == "prompt"
    assert json.loads((r.out / "config.json").read_text())["truncate"] == "auto"
    assert sum("fitted to 32 tokens (--truncate prompt): 4 prompt cut" in x for x in logs) == 1


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_end_and_error_strategies_around_the_limit(tok, tmp_path, extra):
    text = {"text": "the quick brown fox jumps over the lazy dog"}
    n = len(data.encode_record(tok, text, "text", "x")[0])
    limit = n - extra
    p = write(tmp_path, [text])
    ds = data.load_dataset(p, tok, limit)  # auto: plain text is cut at the end
    assert len(ds.examples[0].ids) == min(n, limit) and ds.stats["end_cut"] == (1 if extra > 0 else 0)
    if extra > 0:
        with pytest.raises(DataError, match=f"{p}:1: {n} tokens, more than --max-seq-len {limit}"):
            data.load_dataset(p, tok, limit, truncate="error")
    else:
        assert len(data.load_dataset(p, tok, limit, truncate="error")) == 1


def test_a_template_whose_turns_are_not_prefixes_is_named_when_fitting(tok, tmp_path):
    """A template that renders the turn count first: no turn is a prefix of the next, so the
    answer cannot be located; fitting such a record says so instead of cutting blindly."""
    import dataclasses

    from edgetune.device.tokenizer import _compile

    odd = dataclasses.replace(tok, template=_compile(
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    rec = {"prompt": "the package never arrived " * 6, "completion": "shipping"}
    with pytest.raises(DataError, match=r":1: the chat template does not render turns as prefixes"):
        data.load_dataset(write(tmp_path, [rec]), odd, 24)
