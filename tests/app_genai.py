"""Runs in an environment that holds onnxruntime-genai and what it pulls in, never edgetune.

Opens an edgetune app directory as an app does (``og.Model(APPDIR)``), loads every packed
adapter once with ``og.Adapters``, and generates greedily through the model's chat template
with each adapter and with none, switching adapters between generators on the one model.
Prints JSON: the prompt and reply token ids per adapter and prompt, and what
onnxruntime-genai said about adapter files given in ``--bad``.
"""
import argparse
import json
from pathlib import Path

import onnxruntime_genai as og

ap = argparse.ArgumentParser()
ap.add_argument("appdir")
ap.add_argument("--prompts", required=True, help="JSON list of user messages")
ap.add_argument("--max-new-tokens", type=int, default=32)
ap.add_argument("--logits", action="store_true", help="also return the first step's logits")
ap.add_argument("--bad", nargs="*", default=[], help="adapter files expected to be refused")
args = ap.parse_args()

appdir = Path(args.appdir)
manifest = json.loads((appdir / "manifest.json").read_text())
eos = json.loads((appdir / "genai_config.json").read_text())["model"]["eos_token_id"]
stop_ids = set(eos) if isinstance(eos, list) else {eos}
model = og.Model(str(appdir))
tokenizer = og.Tokenizer(model)
adapters = og.Adapters(model)
for name, entry in sorted(manifest["adapters"].items()):
    adapters.load(str(appdir / entry["file"]), name)


def reply(prompt: str, adapter: str | None) -> dict:
    messages = json.dumps([{"role": "user", "content": prompt}])
    text = tokenizer.apply_chat_template(messages=messages, add_generation_prompt=True)
    ids = [int(i) for i in tokenizer.encode(text)]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + args.max_new_tokens)
    gen = og.Generator(model, params)
    if adapter is not None:
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(ids)
    first = gen.get_logits().reshape(-1)  # the next-token logits after the prompt
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    # onnxruntime-genai appends the stop token it ended on; edgetune does not return it.
    stopped = bool(out) and out[-1] in stop_ids
    return {"prompt_ids": ids, "ids": out[:-1] if stopped else out, "stopped": stopped,
            "text": tokenizer.decode(out[:-1] if stopped else out),
            "logits": first.tolist() if args.logits else None}


prompts = json.loads(args.prompts)
names = [None, *sorted(manifest["adapters"])]
# Every adapter, then none, then the first again: all on one model, never reloading the base.
order = [*names, *names[1:2], None]
runs = [{"adapter": n, "prompt": p, **reply(p, n)} for n in order for p in prompts]
bad = {}
for i, f in enumerate(args.bad):
    try:
        adapters.load(f, f"bad{i}")
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=8)
        gen = og.Generator(model, params)
        gen.set_active_adapter(adapters, f"bad{i}")
        gen.append_tokens([1, 2, 3])
        bad[f] = "accepted"
    except Exception as e:  # noqa: BLE001 - whatever onnxruntime-genai says is the result
        bad[f] = f"{type(e).__name__}: {e}"
print(json.dumps({"onnxruntime_genai": og.__version__, "runs": runs, "bad": bad}))
