"""Tiny models built from configs, for fast tests (needs the export extras)."""
from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
    "category: billing", "category: shipping", "category: technical", "my invoice is wrong",
    "the package never arrived", "the app crashes when I log in", "classify this ticket",
    "What is the capital of France? Paris.", "user assistant system", "0123456789 abcdefghijklmnopqrstuvwxyz",
]


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def make_model(out: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random tiny Llama with a ChatML BPE tokenizer, saved as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def write_chat_data(out: Path, n_train: int = 24, n_valid: int = 6) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    items = [("my invoice is wrong", "billing"), ("the package never arrived", "shipping"),
             ("the app crashes when I log in", "technical")]
    def rec(i):
        q, a = items[i % 3]
        return {"messages": [{"role": "user", "content": f"classify this ticket: {q}"},
                             {"role": "assistant", "content": f"category: {a}"}]}
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(rec(i)) + "\n" for i in range(n)))
    return out


def write_assets(out: Path) -> Path:
    """Everything the device-side tests need, exported here for an environment without torch:
    ``python tests/tiny.py DIR`` then ``EDGETUNE_TEST_ASSETS=DIR EDGETUNE_DEVICE_ONLY=1 pytest``."""
    from edgetune.formats.config import AdapterConfig
    from edgetune.workstation.export import export

    model = make_model(out / "model")
    export(str(model), out / "bundle", AdapterConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")), overwrite=True)
    export(str(model), out / "dora", AdapterConfig(method="dora", rank=4, alpha=8, targets=("q_proj", "v_proj")),
           overwrite=True)
    write_chat_data(out / "data")
    return out


if __name__ == "__main__":
    import sys

    print(write_assets(Path(sys.argv[1])))
