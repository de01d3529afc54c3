"""A chat app over an edgetune app directory, with onnxruntime-genai only (no edgetune).

    pip install onnxruntime-genai
    python chat.py APPDIR                      # chat; type /adapter NAME, /base, /reset or /quit
    python chat.py APPDIR --adapter support --prompt "My order never arrived"   # one reply

The base model is loaded once; adapters are switched per request, as an app serving
several fine-tuned skills from one model would.
"""
import argparse
import json
import sys
from pathlib import Path

import onnxruntime_genai as og


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("appdir")
    ap.add_argument("--adapter", help="start with this adapter (a name in manifest.json)")
    ap.add_argument("--prompt", help="answer this one message and exit")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()

    appdir = Path(args.appdir)
    model = og.Model(str(appdir))
    tokenizer = og.Tokenizer(model)
    stream = tokenizer.create_stream()
    adapters = og.Adapters(model)
    names = sorted(json.loads((appdir / "manifest.json").read_text())["adapters"])
    for name in names:
        adapters.load(str(appdir / f"{name}.onnx_adapter"), name)
    active = args.adapter
    if active is not None and active not in names:
        sys.exit(f"no adapter {active!r} in {appdir}; packed: {', '.join(names)}")

    def reply(history: list) -> str:
        text = tokenizer.apply_chat_template(messages=json.dumps(history), add_generation_prompt=True)
        ids = tokenizer.encode(text)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + args.max_new_tokens)
        gen = og.Generator(model, params)
        if active:
            gen.set_active_adapter(adapters, active)
        gen.append_tokens(ids)
        out = []
        while not gen.is_done():
            gen.generate_next_token()
            tok = gen.get_next_tokens()[0]
            out.append(tok)
            print(stream.decode(tok), end="", flush=True)
        print()
        return tokenizer.decode(out)

    if args.prompt:
        reply([{"role": "user", "content": args.prompt}])
        return
    print(f"adapters: {', '.join(names) or 'none'}; active: {active or 'base'}. /adapter NAME, /base, /reset, /quit")
    history: list = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/base":
            active, history = None, []
            continue
        if line == "/reset":
            history = []
            continue
        if line.startswith("/adapter"):
            name = line.split(maxsplit=1)[1] if " " in line else ""
            if name not in names:
                print(f"no adapter {name!r}; packed: {', '.join(names)}")
                continue
            active, history = name, []  # another skill starts another conversation
            continue
        if line:
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": reply(history)})


if __name__ == "__main__":
    main()
