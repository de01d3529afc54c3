"""Task metrics: what each kind of fine-tuning is judged by, beside loss and perplexity.

- ``classification``: accuracy and macro-F1 over the label set, predicting by scoring every
  label under the model (the sum of its tokens' log-probabilities after the prompt), so an
  answer is never unparseable; plus the confusion table.
- ``qa``: exact match and token F1 with SQuAD's normalisation.
- ``translation``: chrF and BLEU, computed by ``sacrebleu`` (the field's reference
  implementation; ``pip install 'edgetune[tasks]'``).
- ``ner``: entity-level precision, recall and F1 (exact text and type), from replies that are a
  JSON list of ``{"text", "type"}``; a reply that is not such a list counts as predicting
  nothing and is counted as malformed.
- ``chat`` / ``creative``: loss and perplexity, plus length and distinct-1/2 of greedy replies.

Every generated reply can be written to a JSONL file for reading.
"""
from __future__ import annotations

import collections
import json
import re
import string
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from edgetune.formats.config import TASKS
from edgetune.formats.errors import ConfigError, DataError


# -- metrics on strings (each unit-tested against hand-computed values) ---------------------------
def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's token F1, the best over the references."""
    best = 0.0
    p = normalize_answer(prediction).split()
    for ref in references:
        r = normalize_answer(ref).split()
        if not p or not r:
            best = max(best, float(p == r))
            continue
        common = collections.Counter(p) & collections.Counter(r)
        same = sum(common.values())
        if same == 0:
            continue
        precision, recall = same / len(p), same / len(r)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def classification_scores(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over ``labels`` (a label never predicted nor present scores 0 only if
    it is present), per-label F1 and the confusion table ``{gold: {pred: count}}``."""
    if not gold:
        raise DataError("no examples to score")
    acc = float(np.mean([g == p for g, p in zip(gold, pred)]))
    per = {}
    for lab in labels:
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        if tp + fp + fn == 0:
            continue  # neither in the gold set nor predicted: not part of the average
        per[lab] = 2 * tp / (2 * tp + fp + fn)
    confusion: dict[str, dict[str, int]] = {}
    for g, p in zip(gold, pred):
        confusion.setdefault(g, {}).setdefault(p, 0)
        confusion[g][p] += 1
    return {"accuracy": acc, "macro_f1": float(np.mean(list(per.values()))) if per else 0.0, "f1_per_label": per,
            "confusion": confusion}


def parse_entities(reply: str) -> list[tuple[str, str]] | None:
    """A reply's entities as (text, type) pairs; None if the reply is not a JSON list of
    objects with string ``text`` and ``type`` (the declared NER output format)."""
    try:
        obj = json.loads(reply.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, list):
        return None
    out = []
    for e in obj:
        if not isinstance(e, dict) or not isinstance(e.get("text"), str) or not isinstance(e.get("type"), str):
            return None
        out.append((e["text"], e["type"]))
    return out


def entity_scores(gold: Sequence[Sequence[tuple[str, str]]], pred: Sequence[Sequence[tuple[str, str]] | None]
                  ) -> dict[str, Any]:
    """Entity-level micro precision, recall and F1 over exact (text, type) matches, counting
    repeated entities as many times as they occur; malformed predictions predict nothing."""
    tp = fp = fn = 0
    malformed = 0
    for g, p in zip(gold, pred):
        if p is None:
            malformed += 1
            p = []
        gc, pc = collections.Counter(g), collections.Counter(p)
        hit = sum((gc & pc).values())
        tp, fp, fn = tp + hit, fp + sum(pc.values()) - hit, fn + sum(gc.values()) - hit
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "malformed": malformed, "examples": len(gold)}


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens (a diversity measure)."""
    grams = [tuple(t[i:i + n]) for t in (x.split() for x in texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def translation_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    try:
        import sacrebleu
    except ImportError:
        raise ConfigError("translation metrics need sacrebleu: pip install 'edgetune[tasks]'") from None
    return {"chrf": float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score),
            "bleu": float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)}


# -- records -> prompts and references ---------------------------------------------------------
def read_task(data: str | Path) -> str | None:
    """The task a data folder declares in ``task.json`` (``{"task": "qa"}``), if any."""
    from edgetune.formats import atomic as _io

    p = Path(data)
    f = (p if p.is_dir() else p.parent) / "task.json"
    if not f.is_file():
        return None
    task = _io.read_json(f, "the task declaration", 'write {"task": "classification"} or similar', error=DataError)
    name = task.get("task")
    if name not in TASKS:
        raise DataError(f"{f}: task must be one of {', '.join(TASKS)}, got {name!r}")
    return str(name)


def _prompt_and_reference(rec: dict[str, Any], where: str) -> tuple[list[dict[str, str]], str]:
    """The conversation to reply to and the reference reply, from any record format edgetune trains on."""
    from edgetune.device.data import _as_messages, detect_format

    msgs = _as_messages(rec, detect_format(rec, where), where)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: no reference answer (expected messages ending with the assistant's answer, "
                        "prompt/completion, text/label, question/answer or text/entities)")
    return msgs[:-1], msgs[-1]["content"]


def load_records(path: Path) -> list[tuple[str, list[dict[str, str]], str]]:
    from edgetune.device.data import read_jsonl

    out = [(f"{path}:{n}", *_prompt_and_reference(rec, f"{path}:{n}")) for n, rec in read_jsonl(path)]
    if not out:
        raise DataError(f"{path} has no records")
    return out


# -- evaluation with a model -----------------------------------------------------------------------
def _log_softmax_at(row: np.ndarray, token: int) -> float:
    r = row.astype(np.float64)
    m = r.max()
    return float(r[token] - m - np.log(np.exp(r - m).sum()))


def label_logprobs(model: Any, prompt_ids: list[int], labels_ids: Sequence[list[int]]) -> list[float]:
    """The log-probability of each label's tokens after the prompt: the prompt runs once and each
    label continues from its KV cache, so scoring k labels costs one prompt pass, not k."""
    n = len(prompt_ids)
    ids = np.asarray([prompt_ids], np.int64)
    logits, past = model.forward(ids, np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None], model.empty_past(1))
    last = logits[0, -1]
    out = []
    for lab in labels_ids:
        total, row, cache = 0.0, last, past
        for i, t in enumerate(lab):  # one cached decode step per further token, as generation runs
            total += _log_softmax_at(row, t)
            if i + 1 < len(lab):
                step, cache = model.forward(np.asarray([[t]], np.int64), np.ones((1, n + i + 1), np.int64),
                                            np.asarray([[n + i]], np.int64), cache)
                row = step[0, -1]
        out.append(total)
    return out


def label_logprob(model: Any, prompt_ids: list[int], label_ids: list[int]) -> float:
    return label_logprobs(model, prompt_ids, [label_ids])[0]


def evaluate_task(model: Any, path: Path, task: str, labels: Sequence[str] | None = None,
                  max_new_tokens: int = 64, generations: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """The task metric of ``model`` on the records of ``path`` (a progress bar on a terminal if ``progress``)."""
    from tqdm import tqdm


    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    recs = load_records(path)
    if task in ("classification", "qa", "translation"):
        for where, _, ref in recs:
            if not ref.strip():
                raise DataError(f"{where}: the reference answer is empty; every {task} record needs one "
                                "(the metric is never computed on a subset)")
    if labels is not None:
        labels = [lab.strip() for lab in labels if lab.strip()]
        if not labels:
            raise DataError("the label set is empty: give --labels a comma-separated list, or leave it out to use "
                            "the labels of the data")
    out: dict[str, Any] = {"task": task, "examples": len(recs)}
    replies: list[dict[str, Any]] = []
    if task == "classification":
        label_set = sorted(set(labels) if labels else {r for _, _, r in recs})
        if not label_set:
            raise DataError(f"{path}: the label set is empty")
        unseen = sorted({r for _, _, r in recs} - set(label_set))
        gold, pred = [], []
        for where, msgs, ref in tqdm(recs, desc=f"{task} ({len(label_set)} labels scored)", unit="example",
                                     disable=None if progress else True, dynamic_ncols=True):
            prompt = model.tok.encode(model.tok.render(msgs, add_generation_prompt=True))
            scores = dict(zip(label_set, label_logprobs(model, prompt, [model.tok.encode(lab) for lab in label_set])))
            best = max(scores, key=lambda k: scores[k])
            gold.append(ref)
            pred.append(best)
            replies.append({"where": where, "reference": ref, "prediction": best})
        out.update(classification_scores(gold, pred, label_set))
        out["labels"] = label_set
        out["unseen_labels"] = {"labels": unseen, "examples": sum(g in unseen for g in gold)}
    else:
        bar = tqdm(recs, desc=f"{task} (generating)", unit="example", disable=None if progress else True,
                   dynamic_ncols=True)
        new_tokens, t0 = 0, time.perf_counter()
        for where, msgs, ref in bar:
            r = model.reply(msgs, max_new_tokens)
            replies.append({"where": where, "reference": ref, "prediction": r["text"]})
            new_tokens += len(r["token_ids"])
            bar.set_postfix_str(f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.1f} new tok/s")
        preds, refs = [x["prediction"] for x in replies], [x["reference"] for x in replies]
        if task == "qa":
            out["exact_match"] = float(np.mean([exact_match(p, [r]) for p, r in zip(preds, refs)]))
            out["f1"] = float(np.mean([token_f1(p, [r]) for p, r in zip(preds, refs)]))
        elif task == "translation":
            out.update(translation_scores(preds, refs))
        elif task == "ner":
            gold = []
            for x in replies:
                g = parse_entities(x["reference"])
                if g is None:
                    raise DataError(f"{x['where']}: the reference must be a JSON list of {{\"text\", \"type\"}}")
                gold.append(g)
            out.update(entity_scores(gold, [parse_entities(p) for p in preds]))
        else:
            lengths = [len(p.split()) for p in preds]
            out.update({"mean_words": float(np.mean(lengths)), "distinct_1": distinct_n(preds, 1),
                        "distinct_2": distinct_n(preds, 2)})
    if generations is not None:
        from edgetune.formats import atomic as _io

        _io.write_text(generations, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in replies))
        out["generations"] = str(generations)
    return out

