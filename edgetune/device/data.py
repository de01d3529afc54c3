"""JSONL datasets: format detection, tokenization with prompt masking, bucketed batches.

Formats, detected from the keys of each record:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: chat; loss on assistant turns.
- ``{"prompt": ..., "completion": ...}``: one exchange; loss on the completion.
- ``{"text": ..., "label": ...}``: classification; the label is the answer.
- ``{"text": ...}``: plain text; loss on every token.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgetune.device.tokenizer import ChatTokenizer
from edgetune.formats.errors import DataError

IGNORE = -100
FORMATS = {
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "qa": ("question", "answer"),       # optional "context", given before the question
    "ner": ("text", "entities"),         # entities: [{"text", "type"}]; the answer is that JSON list
    "classification": ("text", "label"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    ids: np.ndarray      # int64 [n]
    targets: np.ndarray  # int64 [n], shifted: targets[t] is the token after t, or IGNORE
    source: str          # "file:line"

    @property
    def n_labels(self) -> int:
        return int((self.targets != IGNORE).sum())


@dataclass
class Dataset:
    examples: list[Example]
    path: str
    fmt: str
    truncated: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return int(sum(len(e.ids) for e in self.examples))

    @property
    def labelled(self) -> int:
        return int(sum(e.n_labels for e in self.examples))


def resolve_split(data: str | Path, split: str = "train") -> Path | None:
    """``data`` is a folder with ``{split}.jsonl`` or, for ``train``, a single file."""
    p = Path(data)
    if p.is_dir():
        f = p / f"{split}.jsonl"
        return f if f.is_file() else None
    if split == "train":
        if not p.exists():
            raise DataError(f"data not found: {p} (expected a .jsonl file or a folder with train.jsonl)")
        return p
    return None


def detect_format(record: dict[str, Any], where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for fmt, keys in FORMATS.items():
        if all(k in record for k in keys):
            return fmt
    raise DataError(f"{where}: cannot tell the format from keys {sorted(record)}; expected one of "
                    + "; ".join("+".join(k) for k in FORMATS.values()))


MAX_LINE_BYTES = 32 << 20  # one JSONL record; read in at most this much, never a whole runaway line


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record); blank lines are skipped. A line that is not UTF-8, not JSON
    or not a JSON object is an error naming the file and the line."""
    from edgetune.formats.atomic import guess_encoding

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(f"{path}: {guess_encoding(head)}")
        f.seek(3 if head[:3] == b"\xef\xbb\xbf" else 0)  # a UTF-8 byte-order mark is harmless
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: a line longer than {MAX_LINE_BYTES} bytes is refused "
                                "(split the record, or check that this is a JSON Lines file)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line; "
                                f"{guess_encoding(raw)})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, not a {type(rec).__name__}")
            yield lineno, rec


def _as_messages(record: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]] | None:
    if fmt == "chat":
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} needs a role in {ROLES} and a string content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: a chat record needs at least one assistant message")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if fmt == "completion":
        p, c = record["prompt"], record["completion"]
    elif fmt == "classification":
        p, c = record["text"], record["label"]
        c = str(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else c
    elif fmt == "qa":
        p, c = record["question"], record["answer"]
        ctx = record.get("context")
        if ctx is not None and not isinstance(ctx, str):
            raise DataError(f"{where}: 'context' must be a string")
        if isinstance(p, str) and ctx:
            p = f"{ctx}\n\nQuestion: {p}"
    elif fmt == "ner":
        p, c = record["text"], _entities_answer(record, where)
    else:
        return None
    if not isinstance(p, str) or not isinstance(c, str):
        raise DataError(f"{where}: {FORMATS[fmt][0]!r} and {FORMATS[fmt][1]!r} must be strings")
    msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string (the instruction given before the record)")
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _entities_answer(record: dict[str, Any], where: str) -> str:
    """The declared NER output: the entities as a JSON list of {"text", "type"}, in order."""
    text, ents = record["text"], record["entities"]
    if not isinstance(text, str) or not isinstance(ents, list):
        raise DataError(f"{where}: 'text' must be a string and 'entities' a list of {{\"text\", \"type\"}}")
    for i, e in enumerate(ents):
        if not isinstance(e, dict) or not isinstance(e.get("text"), str) or not isinstance(e.get("type"), str):
            raise DataError(f"{where}: entity {i} needs a string 'text' and 'type'")
        if e["text"] not in text:
            raise DataError(f"{where}: entity {i} {e['text']!r} does not occur in the text")
    return json.dumps([{"text": e["text"], "type": e["type"]} for e in ents], ensure_ascii=False)


def _chat_spans(tok: ChatTokenizer, msgs: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    full = tok.render(msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = tok.render(msgs[:i], add_generation_prompt=True)
        upto = tok.render(msgs[: i + 1])
        # Some templates close a chat with the eos when no generation prompt follows (Phi-3's
        # `{% else %}{{ eos_token }}`): a turn in the middle is then followed by the next turn instead.
        eos = tok.eos_token
        if eos and upto.endswith(eos) and not full.startswith(upto) and full.startswith(upto[: -len(eos)]):
            upto = upto[: -len(eos)]
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise DataError(f"{where}: the chat template does not render turns as prefixes; "
                            "cannot find the assistant tokens (use --no-mask-prompt)")
        spans.append((len(prefix), len(upto)))
    return full, spans


def encode_record(tok: ChatTokenizer, record: dict[str, Any], fmt: str, where: str,
                  mask_prompt: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a per-token 'is labelled' mask for one record."""
    msgs = _as_messages(record, fmt, where)
    if msgs is None:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        ids = tok.encode(text) + [tok.eos_id]
        return np.asarray(ids, np.int64), np.ones(len(ids), bool)
    return _encode_messages(tok, msgs, where, mask_prompt)


def _encode_messages(tok: ChatTokenizer, msgs: list[dict[str, str]], where: str,
                     mask_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    full, spans = _chat_spans(tok, msgs, where)
    ids, offsets = tok.encode_offsets(full)
    if not mask_prompt:
        return np.asarray(ids, np.int64), np.ones(len(ids), bool)
    starts = np.asarray([o[0] for o in offsets], np.int64)
    ends = np.asarray([o[1] for o in offsets], np.int64)
    labelled = np.zeros(len(ids), bool)
    # A token is trained when any part of it is answer text: one that a tokenizer merges across the
    # prompt/answer boundary carries the answer's first characters (as PEFT and TRL recipes label it).
    for a, b in spans:
        labelled |= (starts < b) & (np.maximum(ends, starts + 1) > a)
    return np.asarray(ids, np.int64), labelled


def shift_targets(ids: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    targets = np.full(len(ids), IGNORE, np.int64)
    targets[:-1] = np.where(labelled[1:], ids[1:], IGNORE)
    return targets


TRUNCATE = ("auto", "prompt", "end", "error")


def truncation_for(strategy: str, fmt: str) -> str:
    """``auto`` keeps the answer (cuts the prompt) for chats, completions and labels; plain text is cut at the end."""
    if strategy not in TRUNCATE:
        raise DataError(f"truncate must be one of {', '.join(TRUNCATE)}, got {strategy!r}")
    if strategy == "auto":
        return "end" if fmt == "text" else "prompt"
    if strategy == "prompt" and fmt == "text":
        return "end"  # plain text has no prompt side
    return strategy


def _fit_length(tok: ChatTokenizer, msgs: list[dict[str, str]], where: str, mask_prompt: bool,
                max_seq_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    ids, labelled = _encode_messages(tok, msgs, where, mask_prompt)
    return (ids, labelled) if len(ids) <= max_seq_len else None


def shorten_prompt(tok: ChatTokenizer, record: dict[str, Any], fmt: str, where: str, max_seq_len: int,
                   mask_prompt: bool = True) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Fit a record into ``max_seq_len`` by dropping its oldest whole turns, then cutting the
    end of the last prompt message; the system message, the template and the final answer stay.
    None when the answer alone does not fit."""
    msgs = _as_messages(record, fmt, where) or []
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    msgs = msgs[: last + 1]
    head = msgs[:1] if msgs[0]["role"] == "system" else []
    body = msgs[len(head):]
    kind = "prompt_cut"
    while sum(m["role"] == "assistant" for m in body) > 1:
        body = body[next(i for i, m in enumerate(body) if m["role"] == "assistant") + 1:]
        kind = "turns_dropped"
        fit = _fit_length(tok, head + body, where, mask_prompt, max_seq_len)
        if fit is not None:
            return (*fit, kind)
    prompts = [i for i, m in enumerate(body[:-1]) if m["role"] != "assistant"]
    if not prompts:
        return None
    k = prompts[-1]
    text = body[k]["content"]
    lo, hi, best = 0, len(text), None
    while lo <= hi:  # the longest beginning of the prompt that fits
        mid = (lo + hi) // 2
        trial = head + body[:k] + [{**body[k], "content": text[:mid]}] + body[k + 1:]
        fit = _fit_length(tok, trial, where, mask_prompt, max_seq_len)
        if fit is None:
            hi = mid - 1
        else:
            best, lo = fit, mid + 1
    return None if best is None else (*best, "prompt_cut")


def load_dataset(path: str | Path, tok: ChatTokenizer, max_seq_len: int, mask_prompt: bool = True,
                 truncate: str = "auto") -> Dataset:
    """Read, check and tokenize a JSONL file. Any bad record stops with file and line.

    A record longer than ``max_seq_len`` is fitted as ``truncate`` says (see
    :func:`truncation_for`); one whose answer alone does not fit is skipped and reported,
    or refused with ``truncate="error"``.
    """
    path = Path(path)
    examples: list[Example] = []
    fmt = None
    counts = {"end_cut": 0, "prompt_cut": 0, "turns_dropped": 0}
    skipped: list[str] = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        f = detect_format(rec, where)
        if fmt is None:
            fmt = f
        elif f != fmt:
            raise DataError(f"{where}: record is in {f!r} format but earlier records are {fmt!r}; use one format per file")
        ids, labelled = encode_record(tok, rec, f, where, mask_prompt)
        if len(ids) > max_seq_len:
            how = truncation_for(truncate, f)
            if how == "error":
                raise DataError(f"{where}: {len(ids)} tokens, more than --max-seq-len {max_seq_len}; raise it, "
                                "shorten the record, or choose another --truncate")
            if how == "end":
                ids, labelled = ids[:max_seq_len], labelled[:max_seq_len]
                if not shift_targets(ids, labelled).__ne__(IGNORE).any():
                    skipped.append(where)  # the cut took every answer token: skipped, as "prompt" does
                    continue
                counts["end_cut"] += 1
            else:
                fitted = shorten_prompt(tok, rec, f, where, max_seq_len, mask_prompt)
                if fitted is None:
                    skipped.append(where)
                    continue
                ids, labelled, kind = fitted
                counts[kind] += 1
        targets = shift_targets(ids, labelled)
        if not (targets != IGNORE).any():
            raise DataError(f"{where}: no labelled tokens left after truncation to {max_seq_len} tokens "
                            f"(the record has {len(ids) if len(ids) < max_seq_len else 'more than ' + str(max_seq_len)} "
                            "tokens); raise --max-seq-len or shorten the prompt")
        examples.append(Example(ids, targets, where))
    if not examples:
        raise DataError(f"{path} has no records" + (f" that fit in {max_seq_len} tokens with their answer (all "
                                                    f"{len(skipped)} skipped)" if skipped else ""))
    stats = {"truncate": truncation_for(truncate, fmt or "text"), **counts, "skipped": len(skipped),
             "skipped_records": skipped[:20]}
    return Dataset(examples, str(path), fmt or "text", sum(counts.values()), stats)


@dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray       # int64 [B, T]
    attention_mask: np.ndarray  # int64 [B, T]
    labels: np.ndarray          # int64 [B, T]

    @property
    def n_labels(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        return int((self.attention_mask > 0).sum())


def split_rows(b: Batch, max_tokens: int) -> list[Batch]:
    """Split a padded batch into row chunks of at most ``max_tokens`` padded tokens (0: no split).

    Activation memory grows with the tokens in one forward pass; the chunks' gradients add
    up to the whole batch's, so the step is the same with a fraction of the peak memory.
    """
    rows, t = b.input_ids.shape
    per = rows if max_tokens <= 0 else max(1, max_tokens // t)
    if per >= rows:
        return [b]
    return [_trim(Batch(b.input_ids[i:i + per], b.attention_mask[i:i + per], b.labels[i:i + per]))
            for i in range(0, rows, per)]


def pack(b: Batch, max_tokens: int, multiple: int = 8) -> list[Batch]:
    """The batch's records packed several to a row, in chunks of at most ``max_tokens`` tokens.

    Each row's ``attention_mask`` numbers its records 1, 2, ... (0 is padding): a bundle whose graphs
    read it as segment ids (manifest ``packing``, see
    ``edgetune.workstation.export.segment_attention``) lets a token see only the earlier tokens of its
    own record and restarts positions at each record, so the loss and gradients are the unpacked
    batch's while no padding between records is computed. Rows hold at most ``max(max_tokens,
    longest record)`` tokens (1,024 when ``max_tokens`` is 0); records go, longest first, to the
    emptiest row with room, over as few rows as fit, so rows come out about equally long.
    """
    lengths = (b.attention_mask > 0).sum(axis=1)
    recs = [(int(n), i) for i, n in enumerate(lengths) if n > 0]
    if not recs:
        return [b]
    longest = max(n for n, _ in recs)
    cap = max(longest, max_tokens if max_tokens > 0 else 1024)
    total = sum(n for n, _ in recs)
    rows_n = max(1, math.ceil(total / cap))
    while True:
        fill, rows = [0] * rows_n, [[] for _ in range(rows_n)]
        for n, i in sorted(recs, key=lambda r: (-r[0], r[1])):
            k = min((k for k in range(rows_n) if fill[k] + n <= cap), key=lambda k: fill[k], default=None)
            if k is None:
                break
            fill[k] += n
            rows[k].append(i)
        else:
            break
        rows_n += 1
    width = min(int(math.ceil(max(fill) / multiple) * multiple), max(cap, max(fill)))
    padding = np.argwhere(b.attention_mask == 0)
    pad_id = int(b.input_ids[tuple(padding[0])]) if len(padding) else 0
    ids = np.full((rows_n, width), pad_id, np.int64)
    seg = np.zeros((rows_n, width), np.int64)
    labels = np.full((rows_n, width), IGNORE, np.int64)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(sorted(members)):
            n = int(lengths[i])
            ids[r, at:at + n] = b.input_ids[i, :n]
            labels[r, at:at + n] = b.labels[i, :n]
            seg[r, at:at + n] = s + 1
            at += n
    packed = Batch(ids, seg, labels)
    per = rows_n if max_tokens <= 0 else max(1, max_tokens // width)
    return [Batch(ids[i:i + per], seg[i:i + per], labels[i:i + per]) for i in range(0, rows_n, per)] \
        if per < rows_n else [packed]


def chunks(b: Batch, max_tokens: int, packed: bool) -> list[Batch]:
    """The forward passes of one batch: its records packed (:func:`pack`) or its padded rows in
    chunks (:func:`split_rows`)."""
    return pack(b, max_tokens) if packed else split_rows(b, max_tokens)


def _trim(b: Batch, multiple: int = 8) -> Batch:
    """Drop padding columns that no row of this chunk uses (rows are length-sorted, so short chunks shrink)."""
    longest = int((b.attention_mask > 0).sum(axis=1).max())
    t = min(b.input_ids.shape[1], int(math.ceil(longest / multiple) * multiple))
    return Batch(b.input_ids[:, :t], b.attention_mask[:, :t], b.labels[:, :t])


def collate(examples: list[Example], pad_id: int, multiple: int = 8) -> Batch:
    """Right-pad to the longest example, rounded up to ``multiple`` so few shapes recur."""
    longest = max(len(e.ids) for e in examples)
    t = int(math.ceil(longest / multiple) * multiple)
    ids = np.full((len(examples), t), pad_id, np.int64)
    mask = np.zeros((len(examples), t), np.int64)
    labels = np.full((len(examples), t), IGNORE, np.int64)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n], mask[i, :n], labels[i, :n] = e.ids, 1, e.targets
    return Batch(ids, mask, labels)


def epoch_batches(ds: Dataset, batch_size: int, seed: int, epoch: int, pad_id: int) -> list[Batch]:
    """The epoch's batches: shuffled, then length-bucketed within windows, then shuffled again.

    Deterministic in (seed, epoch), so a resumed run sees the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(ds))
    window = batch_size * 32
    groups: list[list[int]] = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window].tolist(), key=lambda i: len(ds.examples[i].ids))
        groups += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = rng.permutation(len(groups))
    return [collate([ds.examples[i] for i in groups[k]], pad_id) for k in perm]
