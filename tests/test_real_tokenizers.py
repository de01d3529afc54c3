"""The real tokenizers of Llama-3 and Phi-3, from packages on PyPI, on tiny random-weight models
with each family's vocabulary, chat template and generation config.

- Llama-3: the ``tokenizer.model`` (tiktoken ranks) of Meta's own ``llama-models`` package, and its
  ``ChatFormat`` as the reference for chat encoding.
- Phi-3: llama.cpp's ``ggml-vocab-phi-3.gguf``, which the ``llama-cpp-python`` source
  distribution vendors: Phi-3-mini's vocabulary, added tokens and chat template, with the token ids
  Hugging Face's Phi-3 tokenizer gave for llama.cpp's test strings (``.inp``/``.out``) as the reference.

Each model is then exported, trained briefly to answer with a fixed reply, and must stop on its
end-of-turn token (``<|eot_id|>``, ``<|end|>``), which only the generation config lists (the
tokenizer's eos is ``<|end_of_text|>``, ``<|endoftext|>``), in edgetune and in onnxruntime-genai
running the packed app, token for token."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_genai import edgetune_reply, genai_python, run_app

from edgetune.app import pack
from edgetune.device import data, infer, trainer

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "tokenizers"
# llama.cpp's vocabulary files, as vendored by this source distribution (pinned by its hash).
SDIST = ("llama_cpp_python-0.3.36.tar.gz", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")

# Llama-3-Instruct's chat template as its tokenizer_config.json ships it.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# The template of later Phi-3-mini revisions (system turns kept; the eos closes a chat).
PHI3_LATER_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# Family: (tokenizer eos, generation config's eos list, end-of-turn token)
FAMILIES = {"llama3": (128001, [128001, 128008, 128009], 128009),
            "phi3": (32000, [32000, 32001, 32007], 32007)}
REPLY = "Sure."
DIALOG = [{"role": "system", "content": "You sort support tickets."},
          {"role": "user", "content": "my invoice is wrong"},
          {"role": "assistant", "content": "billing"},
          {"role": "user", "content": "Héllo wörld 🙂, 12345 and\n\nmore"}]


def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def llama_cpp_vocab(name: str) -> Path:
    """``models/<name>`` (and its .inp/.out test files) from llama-cpp-python's sdist on PyPI."""
    if not (CACHE / name).is_file():
        index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=60).read().decode()
        url = re.search(r'href="([^"#]*/' + re.escape(SDIST[0]) + ')#', index).group(1)
        blob = urllib.request.urlopen(url, timeout=300).read()
        assert hashlib.sha256(blob).hexdigest() == SDIST[1], f"{url}: not the pinned file"
        CACHE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            files = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                     if m.isfile() and Path(m.name).name.startswith(name)}
        # Each file whole or not at all, the vocabulary itself last: another test worker may be
        # reading (memory-mapping) the files while this one writes them, and a mapped file cut
        # short under a reader kills it with SIGBUS.
        for file in sorted(files, key=lambda f: f == name):
            part = CACHE / f"{file}.{os.getpid()}.part"
            part.write_bytes(files[file])
            os.replace(part, CACHE / file)
    return CACHE / name


def write_llama3(out: Path):
    """Meta's tokenizer converted as transformers converts tiktoken files, Llama-3's special tokens
    at their ids, and a 2-layer Llama with its 128,256-token vocabulary."""
    import llama_models
    from tokenizers import AddedToken
    from transformers import LlamaConfig, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = meta_tokenizer()
    specials = sorted(meta.special_tokens, key=meta.special_tokens.get)
    tok = TikTokenConverter(vocab_file=str(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"),
                            pattern=meta.pat_str).converted()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>", chat_template=LLAMA3_TEMPLATE)
    fast.save_pretrained(out)
    return fast, LlamaConfig(vocab_size=meta.n_words, tie_word_embeddings=True, bos_token_id=meta.bos_id,
                             rope_theta=500000.0)


def write_phi3(out: Path):
    """Phi-3-mini's tokenizer and chat template from llama.cpp's vocabulary file, and a 2-layer
    Phi-3 with its 32,064-token vocabulary (fused qkv_proj and gate_up_proj)."""
    from transformers import AutoTokenizer, Phi3Config

    gguf = llama_cpp_vocab("ggml-vocab-phi-3.gguf")
    fast = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fast.save_pretrained(out)
    return fast, Phi3Config(vocab_size=len(fast), tie_word_embeddings=False, bos_token_id=fast.bos_token_id,
                            pad_token_id=fast.eos_token_id)


def write_model(family: str, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    eos, stops, eot = FAMILIES[family]
    fast, cfg = (write_llama3 if family == "llama3" else write_phi3)(out)
    assert fast.eos_token_id == eos and eot in fast.convert_tokens_to_ids(["<|eot_id|>", "<|end|>"])
    # Two small layers; a wide initialization so a short LoRA run can move the large softmax.
    cfg.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.5,
                "eos_token_id": stops})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    # As the released instruct models' generation_config.json lists them; the tokenizer's eos is the first only.
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=stops).save_pretrained(out)
    return out


_BUILT: dict[str, tuple[Path, Path]] = {}


def built(name: str, tmp_path_factory) -> tuple[Path, Path]:
    """(work directory, exported bundle) for one family, made once per session."""
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    if name not in _BUILT:
        root = tmp_path_factory.mktemp(name)
        model = write_model(name, root / "model")
        _BUILT[name] = root, export(str(model), root / "bundle", AdapterConfig(rank=8, alpha=16, targets=("all-linear",)))
    return _BUILT[name]


def test_llama3_chats_encode_token_for_token_as_metas_chat_format(tmp_path_factory):
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    from edgetune.device.tokenizer import ChatTokenizer

    _, bundle = built("llama3", tmp_path_factory)
    tok = ChatTokenizer.from_dir(bundle)
    meta = meta_tokenizer()
    fmt = ChatFormat(meta)
    # (Hugging Face's template trims each message; Meta's formatter does not: no edge whitespace here.)
    for dialog in (DIALOG[1:2], DIALOG):
        want = fmt.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"],
                                                    stop_reason=StopReason.end_of_turn) for m in dialog]).tokens
        assert tok.encode(tok.render(dialog, add_generation_prompt=True)) == want
    text = "Héllo wörld 🙂, 1234567 tokens   and\n\nnewlines\t<|eot_id|> as text"
    assert tok.encode(text) == meta.encode(text, bos=False, eos=False, allowed_special="all")
    # Training data: each assistant turn is labelled through its <|eot_id|>, nothing else is.
    ids, labelled = data.encode_record(tok, {"messages": DIALOG[:3]}, "chat", "x")
    reply = fmt.encode_message(RawMessage(role="assistant", content="billing", stop_reason=StopReason.end_of_turn),
                               tool_prompt_format=None)[0]
    assert ids[labelled].tolist() == reply[len(fmt._encode_header("assistant")):]


def test_phi3_tokenizer_gives_the_reference_ids_and_its_own_chat_template(tmp_path_factory):
    from edgetune.device.tokenizer import ChatTokenizer

    _, bundle = built("phi3", tmp_path_factory)
    tok = ChatTokenizer.from_dir(bundle)
    vocab = llama_cpp_vocab("ggml-vocab-phi-3.gguf")
    texts = vocab.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    want = vocab.with_suffix(".gguf.out").read_text().split("\n")
    assert len(texts) == len(want) > 40
    for text, ids in zip(texts, want):
        assert tok.encode(text) == [int(i) for i in ids.split()], text
    # Phi-3-mini's template (from the file): the user turn opens the assistant's; <|end|> closes each.
    chat = tok.render(DIALOG[1:3])
    assert chat == "<s><|user|>\nmy invoice is wrong<|end|>\n<|assistant|>\nbilling<|end|>\n"
    ids, labelled = data.encode_record(tok, {"messages": DIALOG[1:4]}, "chat", "x")
    lab = ids[labelled].tolist()  # the reply and its <|end|> (and the newline after it), nothing else
    assert tok.decode(lab).strip() == "billing" and lab.count(32007) == 1 and lab[-1] == tok.encode("\n")[-1]


def test_phi3_later_template_ending_chats_with_eos_labels_every_turn(tmp_path_factory):
    """The template of later Phi-3 revisions closes a chat with the eos unless a generation prompt
    follows, so a turn in the middle is not a prefix of the whole chat as rendered."""
    import dataclasses

    from edgetune.device.tokenizer import ChatTokenizer, _compile

    _, bundle = built("phi3", tmp_path_factory)
    tok = dataclasses.replace(ChatTokenizer.from_dir(bundle), template=_compile(PHI3_LATER_TEMPLATE))
    chat = DIALOG[1:3] + [{"role": "user", "content": "and the refund?"}, {"role": "assistant", "content": "refund"}]
    ids, labelled = data.encode_record(tok, {"messages": chat}, "chat", "x")
    def text(part: list[int]) -> str:  # (this tokenizer decodes a newline after a special token as " \n")
        return tok.decode(part, skip_special=False).replace(" \n", "\n")

    assert text(ids.tolist()).endswith("<|assistant|>\nrefund<|end|>\n<|endoftext|>")
    runs, start = [], None  # the labelled stretches, decoded
    for i, on in enumerate([*labelled.tolist(), False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(text(ids[start:i].tolist()))
            start = None
    assert [r.strip() for r in runs] == ["billing<|end|>", "refund<|end|>\n<|endoftext|>"]


@pytest.fixture(scope="module")
def og_python() -> Path:
    return genai_python()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generation_stops_on_the_end_of_turn_token_in_edgetune_and_onnxruntime_genai(name, tmp_path_factory, og_python):
    root, bundle = built(name, tmp_path_factory)
    eos, stops, eot = FAMILIES[name]
    meta_json = json.loads((bundle / "tokenizer_meta.json").read_text())
    assert meta_json["eos_token_id"] == eos and meta_json["stop_token_ids"] == stops
    d = root / "data"
    d.mkdir()
    recs = [{"messages": [{"role": "user", "content": f"ticket {i}: my invoice is wrong"},
                          {"role": "assistant", "content": REPLY}]} for i in range(16)]
    for split in ("train", "valid"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = trainer.train(bundle, d, root / "run", steps=30, lr=3e-2, batch_size=4, progress=False,
                        log=lambda s: None).out
    prompt = "ticket 99: my invoice is wrong"
    got = edgetune_reply(bundle, prompt, adapter=run, new_tokens=8)
    assert got["text"] == REPLY and len(got["token_ids"]) < 8  # stopped; the stop token is not returned
    # What it stopped on: the adapter's next token after the reply is the end-of-turn token.
    m = infer.Model.open(bundle, run)
    ids = np.asarray([got["prompt_token_ids"] + got["token_ids"]], np.int64)
    assert int(m.logits(ids, np.ones_like(ids))[0, -1].argmax()) == eot
    # The base model has no reason to stop: the stop is the adapter's, not a length limit.
    assert len(edgetune_reply(bundle, prompt, new_tokens=8)["token_ids"]) == 8
    app = root / "app"
    pack.pack(run, bundle, app, name="tickets", dtype="float32")
    assert json.loads((app / "genai_config.json").read_text())["model"]["eos_token_id"] == stops
    res = run_app(og_python, app, prompts=[prompt], new_tokens=8)
    by = {r["adapter"]: r for r in res["runs"]}
    assert by["tickets"]["prompt_ids"] == got["prompt_token_ids"]
    assert by["tickets"]["stopped"] and by["tickets"]["ids"] == got["token_ids"] and by["tickets"]["text"] == REPLY
    assert not by[None]["stopped"]
