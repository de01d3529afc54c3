"""Llama-3's real tokenizer, from Meta's own ``llama-models`` package (its ``tokenizer.model``,
the tiktoken ranks the released models use), on a tiny random-weight Llama with Llama-3's
vocabulary, chat template and generation config.

Checked against Meta's reference code rather than against edgetune itself: chats are encoded token
for token as ``llama_models``' ``ChatFormat`` encodes them, the end-of-turn token ``<|eot_id|>``
is a label of every assistant turn, and generation stops on it (a stop token of the generation
config, not the tokenizer's eos) in edgetune and in onnxruntime-genai running the packed app."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetune import data, infer, pack, trainer
from test_genai import edgetune_reply, og_python, run_app  # noqa: F401 - og_python is a fixture

# Llama-3-Instruct's chat template as its tokenizer_config.json ships it.
TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
            "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
            "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
            "{{ content }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
EOS, EOM, EOT = 128001, 128008, 128009
REPLY = "Sure."
DIALOG = [{"role": "system", "content": "You sort support tickets."},
          {"role": "user", "content": "my invoice is wrong"},
          {"role": "assistant", "content": "billing"},
          {"role": "user", "content": "Héllo wörld 🙂, 12345 and\n\nmore"}]


def meta_tokenizer():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def write_llama3_model(out: Path) -> Path:
    """A Hugging Face folder: Meta's tokenizer converted as transformers converts tiktoken files,
    Llama-3's special tokens at their ids, and a 2-layer Llama with its 128,256-token vocabulary."""
    import llama_models
    import torch
    from tokenizers import AddedToken
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = meta_tokenizer()
    specials = sorted(meta.special_tokens, key=meta.special_tokens.get)
    tok = TikTokenConverter(vocab_file=str(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"),
                            pattern=meta.pat_str).converted()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>", chat_template=TEMPLATE)
    assert fast.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]) == [EOS, EOM, EOT]
    fast.save_pretrained(out)
    torch.manual_seed(0)
    # A wide initialization so a short LoRA run can move the 128k-way softmax.
    cfg = LlamaConfig(vocab_size=meta.n_words, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=meta.bos_id, eos_token_id=[EOS, EOM, EOT],
                      rope_theta=500000.0, initializer_range=0.5)
    LlamaForCausalLM(cfg).save_pretrained(out)
    # As Llama-3.1-Instruct's generation_config.json lists them; the tokenizer's eos is only the first.
    GenerationConfig(bos_token_id=meta.bos_id, eos_token_id=[EOS, EOM, EOT]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    from edgetune.config import AdapterConfig
    from edgetune.export import export

    root = tmp_path_factory.mktemp("llama3")
    model = write_llama3_model(root / "model")
    bundle = export(str(model), root / "bundle", AdapterConfig(rank=8, alpha=16, targets=("all-linear",)))
    return root, bundle


def test_chats_encode_token_for_token_as_metas_chat_format(llama3):
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    from edgetune.tokenizer import ChatTokenizer

    root, bundle = llama3
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
    header = fmt._encode_header("assistant")
    assert ids[labelled].tolist() == reply[len(header):] and ids[labelled][-1] == EOT
    meta_json = json.loads((bundle / "tokenizer_meta.json").read_text())
    assert meta_json["eos_token_id"] == EOS and meta_json["stop_token_ids"] == [EOS, EOM, EOT]


def test_generation_stops_on_eot_id_in_edgetune_and_onnxruntime_genai(llama3, og_python):
    root, bundle = llama3
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
    assert got["text"] == REPLY and len(got["token_ids"]) < 8  # stopped, the stop token not returned
    # What it stopped on: the adapter's next token after the reply is <|eot_id|>, not the eos.
    m = infer.Model.open(bundle, run)
    ids = np.asarray([got["prompt_token_ids"] + got["token_ids"]], np.int64)
    assert int(m.logits(ids, np.ones_like(ids))[0, -1].argmax()) == EOT
    # The base model has no reason to stop: the stop is the adapter's <|eot_id|>, not a length limit.
    assert len(edgetune_reply(bundle, prompt, new_tokens=8)["token_ids"]) == 8
    app = root / "app"
    pack.pack(run, bundle, app, name="tickets", dtype="float32")
    assert json.loads((app / "genai_config.json").read_text())["model"]["eos_token_id"] == [EOS, EOM, EOT]
    res = run_app(og_python, app, prompts=[prompt], new_tokens=8)
    by = {r["adapter"]: r for r in res["runs"]}
    assert by["tickets"]["prompt_ids"] == got["prompt_token_ids"]
    assert by["tickets"]["stopped"] and by["tickets"]["ids"] == got["token_ids"] and by["tickets"]["text"] == REPLY
    assert not by[None]["stopped"]
