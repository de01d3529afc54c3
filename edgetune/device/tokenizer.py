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
    template_path: str = ""

    @classmethod
    def from_dir(cls, root: str | Path) -> "ChatTokenizer":
        from tokenizers import Tokenizer

        from edgetune.formats import atomic as _io
        from edgetune.formats import safety

        root = Path(root)
        fix = "copy the directory again or export it again"
        meta = _io.read_json(root / "tokenizer_meta.json", "the tokenizer settings", fix)
        tpath = safety.inside(root, "tokenizer.json", "tokenizer")
        size = tpath.stat().st_size if tpath.is_file() else 0
        if size > safety.MAX_TOKENIZER_BYTES:
            raise BundleError(f"{tpath}: {size} bytes is refused (a tokenizer file's limit is "
                              f"{safety.MAX_TOKENIZER_BYTES}); {fix}")
        try:
            tok = Tokenizer.from_file(str(tpath))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem to a user
            raise BundleError(f"{root / 'tokenizer.json'}: cannot load the tokenizer "
                              f"({str(e).splitlines()[0][:120]}); {fix}") from None
        if tok.get_vocab_size() > safety.MAX_VOCAB:
            raise BundleError(f"{tpath}: a vocabulary of {tok.get_vocab_size()} tokens is refused (limit "
                              f"{safety.MAX_VOCAB}); {fix}")
        template = None
        cpath = safety.inside(root, meta["chat_template"], "chat template") if meta.get("chat_template") else None
        if cpath is not None and cpath.is_file():
            if cpath.stat().st_size > MAX_TEMPLATE_BYTES:
                raise BundleError(f"{cpath}: {cpath.stat().st_size} bytes is refused (a chat template's limit is "
                                  f"{MAX_TEMPLATE_BYTES}); {fix}")
            try:
                template = _compile(cpath.read_text(encoding="utf-8"))
            except Exception as e:  # noqa: BLE001 - jinja2's syntax errors, a non-UTF-8 file
                raise BundleError(f"{cpath}: not a usable chat template ({e}); {fix}") from None
        for key in ("eos_token_id", "pad_token_id", "eos_token"):
            if key not in meta:
                raise BundleError(f"{root / 'tokenizer_meta.json'}: no {key!r}; {fix}")
        eos = int(meta["eos_token_id"])
        # Bundles from before stop_token_ids stop on the tokenizer's eos only.
        stops = frozenset(int(i) for i in meta.get("stop_token_ids") or [eos])
        return cls(tok, template, meta["eos_token"], eos, int(meta["pad_token_id"]), meta.get("bos_token"), stops,
                   str(cpath) if template is not None else "")

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
        try:
            return render_limited(self.template, messages=messages, add_generation_prompt=add_generation_prompt,
                                  eos_token=self.eos_token, bos_token=self.bos_token or "")
        except TemplateLimit as e:
            raise TemplateLimit(f"{self.template_path}: {e}; get the bundle from its maker again") from None
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja2's errors (a sandbox violation, an undefined name) and the like
            raise DataError(f"{self.template_path}: the chat template failed ({type(e).__name__}: "
                            f"{str(e)[:160]}); get the bundle from its maker again") from None


# A chat template is code from whoever made the bundle: it runs in Jinja's immutable sandbox (no
# attribute of Python's internals, no mutation), and a rendering is stopped past these limits.
MAX_TEMPLATE_BYTES = 1 << 20
MAX_RENDER_CHARS = 16 << 20
MAX_RENDER_SECONDS = 5.0
_MAX_ARG = 1 << 20  # an integer argument larger than this (a repeat count, a width) is refused


class TemplateLimit(DataError):
    """A chat template went past a rendering limit."""


def _limited_env() -> Any:
    import re
    import time

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})
        deadline = float("inf")

        def tick(self) -> None:
            if time.monotonic() > self.deadline:
                raise TemplateLimit(f"chat template: rendering took longer than {MAX_RENDER_SECONDS:.0f} s; refused")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            self.tick()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * max(n, 0) > MAX_RENDER_CHARS:
                        raise TemplateLimit(f"chat template: a repetition of {len(seq)} x {n} items is refused "
                                            f"(limit {MAX_RENDER_CHARS})")
            elif operator == "**" and isinstance(right, int) and right > 64:
                raise TemplateLimit(f"chat template: an exponent of {right} is refused (limit 64)")
            elif operator == "%" and isinstance(left, str) and re.search(r"\d{7,}", left):
                raise TemplateLimit("chat template: a format width of a million or more is refused")
            return super().call_binop(context, operator, left, right)

        def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            self.tick()
            if any(isinstance(a, int) and not isinstance(a, bool) and abs(a) > _MAX_ARG
                   for a in (*args, *kwargs.values())):
                raise TemplateLimit(f"chat template: an argument above {_MAX_ARG} is refused")
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj: Any, attribute: str) -> Any:
            self.tick()
            return super().getattr(obj, attribute)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def limited_range(*args: int) -> Any:
        r = range(*args)
        if len(r) > 100_000:
            raise TemplateLimit(f"chat template: a range of {len(r)} items is refused (limit 100000)")
        for i, v in enumerate(r):
            if i % 256 == 0:
                env.tick()
            yield v

    env.globals["range"] = limited_range
    return env


def render_limited(template: Any, **context: Any) -> str:
    """Render ``template`` (from :func:`_compile`) within the time and output-size limits."""
    import time

    env = template.environment
    env.deadline = time.monotonic() + MAX_RENDER_SECONDS
    out: list[str] = []
    size = 0
    try:
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise TemplateLimit(f"chat template: the rendered text passed {MAX_RENDER_CHARS} characters; refused")
            env.tick()
            out.append(chunk)
    except RecursionError:
        raise TemplateLimit("chat template: recursion too deep; refused") from None
    finally:
        env.deadline = float("inf")
    return "".join(out)


def _compile(source: str) -> Any:
    def raise_exception(msg: str) -> None:
        raise DataError(f"chat template: {msg}")

    # Jinja's immutable sandbox, as transformers uses, so texts match token for token; with limits.
    env = _limited_env()
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
