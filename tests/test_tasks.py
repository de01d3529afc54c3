"""Task metrics against hand-computed values, and eval --task end to end on a tiny model."""
import json
from pathlib import Path

import numpy as np
import pytest

from edgetune.device import tasks
from edgetune.formats.errors import DataError


def test_squad_normalisation_exact_match_and_f1():
    assert tasks.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert tasks.exact_match("the Eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert tasks.exact_match("Paris", ["Eiffel Tower"]) == 0.0
    # prediction "eiffel tower in paris" (4 tokens) vs reference "eiffel tower" (2): 2 common
    # precision 2/4, recall 2/2 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert tasks.token_f1("The Eiffel Tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert tasks.token_f1("", [""]) == 1.0 and tasks.token_f1("x", [""]) == 0.0
    assert tasks.token_f1("x y", ["c d", "y"]) == pytest.approx(2 / 3)  # the best reference counts


def test_classification_accuracy_macro_f1_and_confusion():
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "b"]
    r = tasks.classification_scores(gold, pred, ["a", "b", "c"])
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp2 fn0 -> 2/4; c: tp0 fp0 fn1 -> 0
    assert r["accuracy"] == 0.5
    assert r["f1_per_label"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 0.0})
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert r["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"b": 1}, "c": {"b": 1}}
    with pytest.raises(DataError):
        tasks.classification_scores([], [], ["a"])


def test_entity_f1_counts_malformed_replies_as_predicting_nothing():
    assert tasks.parse_entities('[{"text": "Paris", "type": "LOC"}]') == [("Paris", "LOC")]
    assert tasks.parse_entities("Paris (LOC)") is None
    assert tasks.parse_entities('[{"text": "Paris"}]') is None
    gold = [[("Paris", "LOC"), ("Ada", "PER")], [("ACME", "ORG")]]
    pred = [[("Paris", "LOC"), ("Ada", "ORG")], None]
    r = tasks.entity_scores(gold, pred)
    # tp 1 (Paris/LOC), fp 1 (Ada/ORG), fn 2 (Ada/PER, ACME/ORG)
    assert r["precision"] == 0.5 and r["recall"] == pytest.approx(1 / 3)
    assert r["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)) and r["malformed"] == 1


def test_distinct_n():
    assert tasks.distinct_n(["a b a b"], 1) == 0.5  # 2 distinct of 4
    assert tasks.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert tasks.distinct_n([""], 2) == 0.0


def test_translation_metrics_are_sacrebleus():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = ["the cat sat on the mat", "hello world"], ["the cat sat on a mat", "hello there world"]
    r = tasks.translation_scores(hyps, refs)
    assert r["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert r["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert tasks.translation_scores(refs, refs)["chrf"] == pytest.approx(100.0)


def test_label_scoring_equals_the_sum_of_token_log_probabilities(tiny_bundle):
    from edgetune.device.infer import Model

    m = Model.open(tiny_bundle)
    prompt, label = [1, 20, 30, 40], [50, 60]
    ids = np.asarray([prompt + label], np.int64)
    logits = m.logits(ids, np.ones_like(ids))[0].astype(np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    want = lp[3, 50] + lp[4, 60]
    assert tasks.label_logprob(m, prompt, label) == pytest.approx(want, rel=1e-6)


def test_eval_task_classification_and_qa_end_to_end(tiny_bundle, chat_data, tmp_path):
    from click.testing import CliRunner

    from edgetune.cli import main

    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "my invoice is wrong", "label": "billing"}, {"text": "the app crashes", "label": "technical"},
        {"text": "where is my parcel", "label": "weather"}]))
    r = CliRunner().invoke(main, ["eval", str(tiny_bundle), "--data", str(tmp_path / "test.jsonl"), "--task",
                                  "classification", "--labels", "billing,technical,shipping", "--json",
                                  "--generations", str(tmp_path / "g.jsonl")])
    assert r.exit_code == 0, r.output
    tm = json.loads(r.output)["task_metrics"]
    assert tm["labels"] == ["billing", "shipping", "technical"] and tm["examples"] == 3
    assert tm["unseen_labels"] == {"labels": ["weather"], "examples": 1}
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 3
    (tmp_path / "qa").mkdir()
    (tmp_path / "qa" / "test.jsonl").write_text(json.dumps({"question": "capital of France?", "answer": "Paris"}) + "\n")
    (tmp_path / "qa" / "task.json").write_text('{"task": "qa"}')
    r = CliRunner().invoke(main, ["eval", str(tiny_bundle), "--data", str(tmp_path / "qa"), "--json",
                                  "--max-new-tokens", "4", "--generations", str(tmp_path / "qa.jsonl")])
    assert r.exit_code == 0, r.output
    tm = json.loads(r.output)["task_metrics"]
    (reply,) = [json.loads(x) for x in (tmp_path / "qa.jsonl").read_text().splitlines()]
    em, f1 = _squad_scores(reply["prediction"], "Paris")
    assert tm["task"] == "qa" and tm["exact_match"] == pytest.approx(em) and tm["f1"] == pytest.approx(f1)


def _squad_scores(prediction: str, answer: str) -> tuple[float, float]:
    """SQuAD's exact match and token F1, written out here independently of edgetune.device.tasks."""
    import re
    import string
    from collections import Counter

    def norm(t: str) -> list[str]:
        t = "".join(c for c in t.lower() if c not in set(string.punctuation))
        return re.sub(r"\b(a|an|the)\b", " ", t).split()

    p, g = norm(prediction), norm(answer)
    if not p or not g:
        return float(p == g), float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    f1 = 0.0 if common == 0 else 2 * (common / len(p)) * (common / len(g)) / (common / len(p) + common / len(g))
    return float(p == g), f1


def test_qa_scores_match_squad_by_hand():
    for pred, ref in (("Paris", "paris"), ("The Eiffel tower, Paris!", "Paris"), ("in Lyon", "Paris"),
                      ("an apple a day", "the apple day"), ("...", "Paris"), ("the", "a")):
        em, f1 = _squad_scores(pred, ref)
        assert tasks.exact_match(pred, [ref]) == em and tasks.token_f1(pred, [ref]) == pytest.approx(f1), (pred, ref)


def test_task_data_errors_name_file_and_line(tiny_bundle, tmp_path):
    from edgetune.device.infer import Model

    m = Model.open(tiny_bundle)
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "x", "label": "a"}) + "\n" + json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:2: cannot tell the format"):
        tasks.evaluate_task(m, f, "qa")
    f.write_text(json.dumps({"prompt": "x", "completion": "not json"}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:1: the reference must be a JSON list"):
        tasks.evaluate_task(m, f, "ner", max_new_tokens=2)
    f.write_text(json.dumps({"question": "x?", "answer": "y"}) + "\n" + json.dumps({"question": "z?", "answer": " "}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:2: the reference answer is empty"):
        tasks.evaluate_task(m, f, "qa")
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:1: a chat record needs at least one assistant message"):
        tasks.evaluate_task(m, f, "translation")
    f.write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    with pytest.raises(DataError, match="the label set is empty"):
        tasks.evaluate_task(m, f, "classification", labels=["", " "])
    (tmp_path / "task.json").write_text('{"task": "poetry"}')
    with pytest.raises(DataError, match="task must be one of"):
        tasks.read_task(tmp_path)


def test_ner_and_qa_records_train_and_are_checked(tiny_tokenizer, tmp_path):
    from edgetune.device import data

    f = tmp_path / "train.jsonl"
    ner = {"text": "Ada lives in Paris", "entities": [{"text": "Paris", "type": "LOC"}]}
    qa = {"question": "Where?", "context": "Ada lives in Paris.", "answer": "Paris"}
    for rec, fmt in ((ner, "ner"), (qa, "qa")):
        f.write_text(json.dumps(rec) + "\n")
        ds = data.load_dataset(f, tiny_tokenizer, 256)
        assert len(ds) == 1 and ds.fmt == fmt and ds.labelled > 0
    msgs, ref = tasks._prompt_and_reference(ner, "x")
    assert json.loads(ref) == [{"text": "Paris", "type": "LOC"}] and msgs[-1]["content"] == "Ada lives in Paris"
    msgs, ref = tasks._prompt_and_reference(qa, "x")
    assert ref == "Paris" and msgs[-1]["content"].startswith("Ada lives in Paris.\n\nQuestion: Where?")
    f.write_text(json.dumps({"text": "Ada lives in Rome", "entities": [{"text": "Paris", "type": "LOC"}]}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: entity 0 'Paris' does not occur in the text"):
        data.load_dataset(f, tiny_tokenizer, 256)


def test_training_reports_the_task_metric_on_the_validation_set(tiny_bundle, chat_data, tmp_path):
    import shutil

    from edgetune.device import trainer

    d = tmp_path / "d"
    shutil.copytree(chat_data, d)
    (d / "task.json").write_text('{"task": "classification"}')
    logs = []
    r = trainer.train(tiny_bundle, d, tmp_path / "run", steps=4, eval_every=2, batch_size=4, lr=5e-2,
                      progress=False, log=logs.append)
    recs = [json.loads(x) for x in (r.out / "metrics.jsonl").read_text().splitlines()]
    with_task = [x for x in recs if "task_metrics" in x]
    assert [x["step"] for x in with_task] == [2, 4]
    assert {"accuracy", "macro_f1"} <= set(with_task[-1]["task_metrics"])
    assert any(s.startswith("step 2: classification accuracy") for s in logs)
    assert any(s.startswith("final classification on the validation set") for s in logs)
    assert r.summary["task"] == "classification" and "accuracy" in r.summary["task_metrics"]



EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"


@pytest.mark.parametrize("name", ["translation", "classification", "ner", "qa", "chat", "creative", "domain"])
def test_example_task_folders_are_well_formed(name):
    """Each shipped task folder reads in its declared task, has three disjoint splits, and its
    test set asks for no label the training set lacks."""
    from edgetune.device import data

    folder = EXAMPLES / name
    task = tasks.read_task(folder)
    assert (task is None) == (name == "domain")
    splits = {}
    for split in ("train", "valid", "test"):
        recs = [rec for _, rec in data.read_jsonl(folder / f"{split}.jsonl")]
        assert len(recs) >= 10
        splits[split] = {json.dumps(r, sort_keys=True) for r in recs}
        if task:
            assert len(tasks.load_records(folder / f"{split}.jsonl")) == len(recs)
    assert not splits["train"] & splits["test"] and not splits["train"] & splits["valid"]
    if task == "classification":
        labels = {s: {ref for _, _, ref in tasks.load_records(folder / f"{s}.jsonl")} for s in ("train", "test")}
        assert labels["test"] <= labels["train"] and len(labels["train"]) >= 2
