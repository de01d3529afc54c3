"""Tokenizer and chat template for the device: ``tokenizers`` and ``jinja2`` only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edgetune.formats.errors import BundleError, DataError


@dataclass
class ChatTokenizer:
    """Encodes text and renders chats with the model's own template."""

    tok: Any
    template: Any
    eos_token: str
    eos_id: int
    pad_id: int
    bos_token: str | None
    stop_ids: frozenset[int] = frozenset()

    @classmethod
    def from_dir(cls, root: str | Path) -> "ChatTokenizer":
        from tokenizers import Tokenizer

        from edgetune.formats import atomic as _io

        root = Path(root)
        fix = "copy the directory again or export it again"
        meta = _io.read_json(root / "tokenizer_meta.json", "the tokenizer settings", fix)
        try:
            tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem to a user
            raise BundleError(f"{root / 'tokenizer.json'}: cannot load the tokenizer "
                              f"({str(e).splitlines()[0][:120]}); {fix}") from None
        template = None
        if meta.get("chat_template") and (root / meta["chat_template"]).is_file():
            try:
                template = _compile((root / meta["chat_template"]).read_text(encoding="utf-8"))
            except Exception as e:  # noqa: BLE001 - jinja2's syntax errors, a non-UTF-8 file
                raise BundleError(f"{root / meta['chat_template']}: not a usable chat template ({e}); {fix}") from None
        for key in ("eos_token_id", "pad_token_id", "eos_token"):
            if key not in meta:
                raise BundleError(f"{root / 'tokenizer_meta.json'}: no {key!r}; {fix}")
        eos = int(meta["eos_token_id"])
        # Bundles from before stop_token_ids stop on the tokenizer's eos only.
        stops = frozenset(int(i) for i in meta.get("stop_token_ids") or [eos])
        return cls(tok, template, meta["eos_token"], eos, int(meta["pad_token_id"]), meta.get("bos_token"), stops)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render ``messages`` with the chat template (plain ``role: content`` lines if none)."""
        if self.template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    eos_token=self.eos_token, bos_token=self.bos_token or "")


def _compile(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise DataError(f"chat template: {msg}")

    # The same environment transformers uses, so texts match token for token.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
