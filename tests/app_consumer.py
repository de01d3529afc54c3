"""Runs in an environment with only onnxruntime (>= 1.20, the inference package) and numpy.

Loads an edgetune app directory the way an app does: the base model once, then adapters
through ``LoraAdapter`` and ``RunOptions.add_active_adapter``, switching between them
without reloading the base. Writes the logits it got to an .npz file.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

appdir, ids_file, out_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
model_file = sys.argv[4] if len(sys.argv) > 4 else "base.onnx"  # or base.ort, the mobile format
manifest = json.loads((appdir / "manifest.json").read_text())
info = manifest["infer"]
ids = np.load(ids_file)
sess = ort.InferenceSession(str(appdir / model_file), providers=["CPUExecutionProvider"])
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
empty = np.zeros((1, info["kv_heads"], 0, info["head_dim"]), np.float32)
for i in range(info["num_layers"]):
    feed[f"past_key_values.{i}.key"] = empty
    feed[f"past_key_values.{i}.value"] = empty
results = {"base": sess.run(["logits"], feed)[0]}
adapters = {}
for name, entry in sorted(manifest["adapters"].items()):
    a = ort.LoraAdapter()
    a.Load(str(appdir / entry["file"]))
    adapters[name] = a
# Switch back and forth on the same session: A, B, A, then no adapter again.
for name in [*sorted(adapters), sorted(adapters)[0]]:
    ro = ort.RunOptions()
    ro.add_active_adapter(adapters[name])
    results[name] = sess.run(["logits"], feed, ro)[0]
results["base_again"] = sess.run(["logits"], feed)[0]
np.savez(out_file, **results)
print(json.dumps({"onnxruntime": ort.__version__, "ran": sorted(results)}))
