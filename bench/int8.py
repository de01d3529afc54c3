"""The int8 lever for training, measured rather than shipped: a copy of an exported bundle whose
frozen-weight products run as ONNX Runtime's ``DynamicQuantizeMatMul`` (MLAS's integer kernels:
AMX or VNNI where the CPU has them).

Every ``MatMul``/``FusedMatMul`` whose second operand is a frozen weight (the body's forward
``x @ W^T``, its backward ``dY @ W``, and the tied ``lm_head`` both ways) in ``train.onnx`` and
``eval.onnx`` is replaced by ``DynamicQuantizeMatMul(x, Wq, s)``: the weight, as the ``[K, N]``
matrix the product multiplies by, in int8 with one scale per column (symmetric, absmax / 127), and
the activation (or the incoming gradient) quantized to uint8 per call by the op, per tensor. The
adapters, attention and everything else stay float32; the float32 weights a graph still reads
(the embedding's ``Gather``, the norms) stay in ``train.onnx.data``. The int8 copies (one for the
forward layout, one for the backward) go to ``int8.data`` beside it.

``bench/train.py --int8`` trains this copy in lockstep with the bundle it came from and reports
its speed and validation loss against it (``int8_*`` keys); ``--int8 forward`` leaves the
backward products float32, and ``--int8 smooth`` quantizes every product but ``lm_head`` after
SmoothQuant's per-channel smoothing of the forward products (:func:`calibrate`).
``bench/train.py`` prints the machine the run was on (CPU model and instruction sets: avx2,
avx512f, avx512_vnni, amx_int8...); this module only writes the bundle.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

PRODUCTS = ("MatMul", "FusedMatMul")


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _layer_key(name: str) -> str:
    """``layers.3.mlp.down_proj`` from an ONNX weight name or a PyTorch module name."""
    parts = name.split(".")
    i = parts.index("layers")
    return ".".join(parts[i: i + 4])


def calibrate(batches: list) -> dict[str, np.ndarray]:
    """Per input channel, the largest |activation| each linear layer of the base model sees on four
    training batches (PyTorch forward hooks; the untrained adapter adds nothing): SmoothQuant's
    statistics. ``batches``: the first training batches of bench/train.py's workload."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.formats.models import DEFAULT_MODEL, resolve_model
    from edgetune.workstation.export import _converted_gguf

    gguf, _ = resolve_model(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(_converted_gguf(gguf, print), dtype=torch.float32).eval()
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(_mod, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
        return f

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            mod.register_forward_pre_hook(hook(_layer_key(name)))
    with torch.no_grad():
        for b in batches[:4]:  # training batches: the validation set stays unseen
            model.model(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask),
                        use_cache=False)
    return {k: v.numpy().astype(np.float32) for k, v in amax.items()}


def _append(out_data: Path, offset: list[int], name: str, arr: np.ndarray, dt: int):
    """``arr`` appended to ``out_data`` (64-byte aligned) as an external initializer."""
    from onnx import TensorProto

    with open(out_data, "ab") as f:
        pad = (-offset[0]) % 64
        f.write(b"\0" * pad)
        offset[0] += pad
        f.write(arr.tobytes())
    t = TensorProto(name=name, data_type=dt, dims=list(arr.shape))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", out_data.name), ("offset", str(offset[0])), ("length", str(arr.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    offset[0] += arr.nbytes
    return t


def _rewrite(model, weights, out_data: Path, quantized: dict, offset: list[int], keep, backward: bool,
             smooth: dict[str, np.ndarray] | None = None, alpha: float = 0.5) -> int:
    """Replace the frozen-weight products of ``model`` in place (but those of weights ``keep``
    names, and with ``backward`` false the backward ``dY @ W``, which has no transposed operand);
    new int8 tensors are appended to ``out_data`` (shared between graphs through ``quantized``).
    With ``smooth`` (per-channel activation maxima by layer, from :func:`calibrate`), a forward
    product ``x @ W^T`` becomes ``(x / s) @ (W s)^T`` with ``s = max|x|^alpha / max|W|^(1 - alpha)``
    per input channel (SmoothQuant): the activation's outlier channels move into the weight, whose
    scales are per column, before the per-tensor activation scale is taken. Returns the number
    replaced."""
    from onnx import TensorProto, helper

    g = model.graph
    frozen = set(weights)
    new_nodes, n = [], 0
    for node in g.node:
        at = _attrs(node)
        if (node.op_type not in PRODUCTS or len(node.input) != 2 or node.input[1] not in frozen
                or at.get("transA") or at.get("transBatchA") or at.get("transBatchB")
                or len(weights[node.input[1]].shape) != 2 or keep(node.input[1])
                or (not at.get("transB") and not backward)):
            new_nodes.append(node)
            continue
        trans, mult = int(at.get("transB", 0)), float(at.get("alpha", 1.0))
        layer = _layer_key(node.input[1]) if ".layers." in node.input[1] else None
        sm = smooth.get(layer) if smooth and trans and layer else None
        key = (node.input[1], trans, mult)
        if key not in quantized:
            w = np.asarray(weights[node.input[1]], np.float32)
            wkn = (w.T if trans else w) * mult
            extra = []
            if sm is not None:  # wkn is [K, N]: row k scales by s_k
                s = (np.maximum(sm, 1e-5) ** alpha / np.maximum(np.abs(wkn).max(1), 1e-5) ** (1 - alpha))
                s = np.clip(s, 1e-2, 1e2).astype(np.float32)
                wkn = wkn * s[:, None]
                extra = [_append(out_data, offset, f"{node.input[1]}.smooth_inv", (1 / s).astype(np.float32),
                                 TensorProto.FLOAT)]
            scale = (np.maximum(np.abs(wkn).max(0), 1e-30) / 127).astype(np.float32)
            q = np.ascontiguousarray(np.clip(np.round(wkn / scale), -127, 127).astype(np.int8))
            base = f"{node.input[1]}.int8{'t' if trans else ''}"
            quantized[key] = [_append(out_data, offset, base, q, TensorProto.INT8),
                              _append(out_data, offset, base + ".scale", scale, TensorProto.FLOAT)] + extra
        tensors = quantized[key]
        if tensors[0].name not in {i.name for i in g.initializer}:
            g.initializer.extend(tensors)
        x = node.input[0]
        if len(tensors) > 2:
            x = f"{node.name}.smoothed"
            new_nodes.append(helper.make_node("Mul", [node.input[0], tensors[2].name], [x], name=x))
        new_nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, tensors[0].name, tensors[1].name],
                                          list(node.output), name=node.name, domain="com.microsoft"))
        n += 1
    del g.node[:]
    g.node.extend(new_nodes)
    return n


def keep_float(name: str) -> bool:
    """The products that stay float32: those whose activation a per-tensor scale cannot hold. The
    MLP's ``down_proj`` input (SiLU(gate) * up) and ``o_proj``'s have outlier channels, and the
    tied ``lm_head`` decides the loss; quantized, they moved the validation loss of the untrained
    adapter from 1.3568 to 1.862 (all products), 1.382 (all but lm_head and down_proj) and 1.351
    (all but these three)."""
    return "embed_tokens" in name or "down_proj" in name or "o_proj" in name


def int8_bundle(src: Path, dst: Path, keep=keep_float, backward: bool = True,
                smooth: dict[str, np.ndarray] | None = None) -> Path:
    """``dst``: ``src`` with its frozen-weight products in int8 (made once; reused while ``src``'s
    manifest and these options are unchanged)."""
    import onnx

    from edgetune.formats import atomic as _io
    from edgetune.formats import bundle as B

    src, dst = Path(src), Path(dst)
    manifest = json.loads((src / "edgetune.json").read_text())
    stamp = dst / "int8-source.json"
    ident = {"manifest_sha256": manifest.get("manifest_sha256"), "backward": backward,
             "float": sorted(k for k in manifest["train_weights"] if keep(k)),
             "smooth": sorted([k, float(v.sum())] for k, v in smooth.items()) if smooth else None}
    if stamp.is_file() and json.loads(stamp.read_text()) == ident:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("train.onnx", "eval.onnx", "edgetune.json"):
            try:  # a hard link: ONNX Runtime refuses external data behind a symlink out of the folder
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    index = manifest["train_weights"]
    raw = np.memmap(src / "train.onnx.data", dtype=np.uint8, mode="r")
    weights = {k: np.frombuffer(raw[e["offset"]: e["offset"] + e["length"]], e["dtype"]).reshape(e["shape"])
               for k, e in index.items() if e["file"] == "train.onnx.data" and e["dtype"] == "float32"}
    data = dst / "int8.data"
    quantized: dict = {}
    offset = [0]
    used: set[str] = set()
    for name in ("train.onnx", "eval.onnx"):
        model = onnx.load(str(src / name), load_external_data=False)
        n = _rewrite(model, weights, data, quantized, offset, keep, backward, smooth)
        print(f"{name}: {n} frozen-weight products in int8")
        onnx.save(model, str(dst / name))
        used |= {x for node in model.graph.node for x in node.input}
    manifest["train_weights"] = {k: e for k, e in index.items() if k in used}
    files = dict(manifest["files"])
    for name in ("train.onnx", "eval.onnx"):
        files[name] = _io.sha256_file(dst / name)
    manifest["files"] = files
    manifest["sizes"] = {k: (dst / k).stat().st_size for k in files}
    _io.write_json(dst / "edgetune.json", _io.seal({k: v for k, v in manifest.items() if k != _io.SEAL}))
    B.load(dst)  # the copy opens as a bundle
    stamp.write_text(json.dumps(ident))
    return dst
