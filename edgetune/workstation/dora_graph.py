"""``dora_norms.onnx``: DoRA's weight norms as an ONNX graph, so that an app without Python (and
the Python trainer, which runs the same graph) computes the ``dora_norm.*`` inputs of the training
graph from the adapter as it is before each optimizer step (see :mod:`edgetune.device.dora`).

Inputs: every DoRA layer's ``lora_A`` and ``lora_B`` tensors (graph names) and, with a quantized
base, the dequantization's run-time input. Outputs: ``dora_norm.<module>`` per layer, the row
norms ``||W + s B A||`` computed without forming ``W + s B A``:
``||W_o||^2 + 2 s (W A^T)_o . B_o + s^2 B_o (A A^T) B_o^T``. The frozen ``W`` are the training
graph's own tensors (float or quantized codes, read from ``train.onnx.data``), dequantized by
the same nodes, so the norms are those of the weights the training graph multiplies by.
Float32 throughout, like the other graphs an app runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgetune.device import dora
from edgetune.formats.quantized import RUNTIME_SHIFT, tensor_names


def build(train_onnx: Path, trainable: list[str], scale: float, quant: dict[str, Any] | None) -> Any | None:
    """The norm graph of a bundle's DoRA layers, reading the frozen weights through the
    external-data references of ``train_onnx`` (so it must be saved beside it); None without DoRA."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgetune.workstation.quantize import dequant_ops

    mods = dora.modules(trainable)
    if not mods:
        return None
    train = onnx.load(str(train_onnx), load_external_data=False)
    inits = {i.name: i for i in train.graph.initializer}
    nodes: list[Any] = []
    consts: dict[str, np.ndarray] = {"dora/axis1": np.array([1], np.int64), "dora/two_s": np.array(2.0 * scale, np.float32),
                                     "dora/s2": np.array(scale * scale, np.float32), "dora/zero": np.array(0.0, np.float32)}
    used: list[Any] = []
    inputs, outputs = [], []
    shift = False
    for m in mods:
        a_shape = [d.dim_value for d in _value_info(train, m.a).type.tensor_type.shape.dim]
        b_shape = [d.dim_value for d in _value_info(train, m.b).type.tensor_type.shape.dim]
        inputs += [helper.make_tensor_value_info(m.a, TensorProto.FLOAT, a_shape),
                   helper.make_tensor_value_info(m.b, TensorProto.FLOAT, b_shape)]
        p = f"dora/{m.path}"
        w = m.base
        if w in inits:
            used.append(inits[w])
        else:  # a quantized base: the same dequantization as the training graph's
            qn, sn, zn = tensor_names(w)
            if quant is None or qn not in inits:
                raise ValueError(f"the training graph has no weight {w} for the DoRA layer {m.path}")
            used += [inits[qn], inits[sn]] + ([inits[zn]] if zn in inits else [])
            dq, c = dequant_ops(qn, sn, zn if zn in inits else None, f"{p}.w", b_shape[0], a_shape[1],
                                int(quant["bits"]), int(quant["block_size"]))
            nodes += dq
            consts.update(c)
            w = f"{p}.w"
            shift = True
        out = m.norm_input
        nodes += [
            helper.make_node("Mul", [w, w], [f"{p}.w2"]),
            helper.make_node("ReduceSum", [f"{p}.w2", "dora/axis1"], [f"{p}.wsq"], keepdims=0),
            helper.make_node("Gemm", [w, m.a], [f"{p}.wa"], transB=1),          # W A^T   [out, r]
            helper.make_node("Mul", [f"{p}.wa", m.b], [f"{p}.wab"]),
            helper.make_node("ReduceSum", [f"{p}.wab", "dora/axis1"], [f"{p}.cross"], keepdims=0),
            helper.make_node("Gemm", [m.a, m.a], [f"{p}.aa"], transB=1),        # A A^T   [r, r]
            helper.make_node("MatMul", [m.b, f"{p}.aa"], [f"{p}.baa"]),          # B A A^T [out, r]
            helper.make_node("Mul", [f"{p}.baa", m.b], [f"{p}.baab"]),
            helper.make_node("ReduceSum", [f"{p}.baab", "dora/axis1"], [f"{p}.lsq"], keepdims=0),
            helper.make_node("Mul", [f"{p}.cross", "dora/two_s"], [f"{p}.cross2"]),
            helper.make_node("Mul", [f"{p}.lsq", "dora/s2"], [f"{p}.lsq2"]),
            helper.make_node("Add", [f"{p}.wsq", f"{p}.cross2"], [f"{p}.sum1"]),
            helper.make_node("Add", [f"{p}.sum1", f"{p}.lsq2"], [f"{p}.sq"]),
            helper.make_node("Max", [f"{p}.sq", "dora/zero"], [f"{p}.sq0"]),
            helper.make_node("Sqrt", [f"{p}.sq0"], [out]),
        ]
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [b_shape[0]]))
    if shift:
        inputs.append(helper.make_tensor_value_info(RUNTIME_SHIFT, TensorProto.UINT8, []))
    initializers = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    for t in used:  # the training graph's tensors, external-data references and all
        copy = TensorProto()
        copy.CopyFrom(t)
        initializers.append(copy)
    graph = helper.make_graph(nodes, "edgetune_dora_norms", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 17)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgetune")
    model.ir_version = 8
    return model


def _value_info(model: Any, name: str) -> Any:
    for v in model.graph.input:
        if v.name == name:
            return v
    raise ValueError(f"{name} is not an input of the training graph")
