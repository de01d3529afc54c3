"""Edits of exported ONNX graphs (workstation side, needs ``onnx``).

Renaming to PEFT's names, exposing adapter weights as inputs, sharing one weight file
between graphs, and the adapter-free and app graphs derived from the inference graph.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgetune.formats.errors import ModelError


def consumers_of(g: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in g.node:
        for i in node.input:
            out.setdefault(i, []).append(node)
    return out


def rewire(g: Any, old: str, new: str) -> None:
    """Every node that reads ``old`` reads ``new`` instead."""
    for node in g.node:
        node.input[:] = [new if i == old else i for i in node.input]


def relocate(g: Any, data_name: str) -> None:
    """Point every external initializer at ``data_name`` (same offsets)."""
    for init in g.initializer:
        for e in init.external_data:
            if e.key == "location":
                e.value = data_name


def share_external_data(proto: Any, saved: Path) -> None:
    """Point ``proto``'s initializers at the external data of the already saved graph
    ``saved`` wherever name, type and shape agree, so both graphs read one weight file."""
    import onnx

    ref = onnx.load(str(saved), load_external_data=False)
    external = {i.name: i for i in ref.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    for init in proto.graph.initializer:
        other = external.get(init.name)
        if other is not None and other.data_type == init.data_type and list(other.dims) == list(init.dims):
            init.CopyFrom(other)


def strip_prefix(model_proto: Any, prefix: str = "pm.") -> None:
    """Rename ``pm.base_model...`` to PEFT's ``base_model...`` everywhere in the graph."""
    def fix(name: str) -> str:
        return name[len(prefix):] if name.startswith(prefix) else name

    g = model_proto.graph
    for init in g.initializer:
        init.name = fix(init.name)
    for node in g.node:
        node.input[:] = [fix(n) for n in node.input]
        node.output[:] = [fix(n) for n in node.output]
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = fix(vi.name)


def expose_as_inputs(proto: Any, names: list[str]) -> None:
    """Make the named initializers graph inputs too, so a caller may override them."""
    from onnx import helper

    inits = {i.name: i for i in proto.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ModelError(f"adapter weights missing from the inference graph: {missing[:3]}")
    for n in names:
        proto.graph.input.append(helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)))


def disable_dropout(proto: Any) -> None:
    """Validation must not drop units: cut Dropout's training_mode input in the eval graph."""
    for node in proto.graph.node:
        if node.op_type == "Dropout" and len(node.input) > 2:
            del node.input[2]


def hf_name(graph_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` -> ``model.layers.0.self_attn.q_proj.weight``."""
    name = graph_name[len("base_model.model."):] if graph_name.startswith("base_model.model.") else graph_name
    return name.replace(".base_layer.", ".")


NUMPY_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8"}


def external_index(onnx_path: Path) -> dict[str, dict[str, Any]]:
    """Every external initializer of a graph: name -> offset, length, shape, dtype (so a device
    without the onnx package can map the weights itself)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in init.external_data}
        out[init.name] = {"offset": int(ext.get("offset", 0)), "length": int(ext["length"]), "shape": list(init.dims),
                          "dtype": NUMPY_DTYPES[init.data_type], "file": ext["location"]}
    return out


def weights_index(onnx_path: Path, hf_names: set[str]) -> dict[str, dict[str, Any]]:
    """Where each base weight lives in the external data file: HF name -> offset, length, shape."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for init in proto.graph.initializer:
        name = hf_name(init.name)
        if name not in hf_names or "lora_" in init.name:
            continue
        ext = {e.key: e.value for e in init.external_data}
        if init.data_type != onnx.TensorProto.FLOAT or "offset" not in ext:
            raise ModelError(f"{init.name}: expected a float32 external tensor")
        out[name] = {"graph_name": init.name, "offset": int(ext["offset"]), "length": int(ext["length"]),
                     "shape": list(init.dims), "dtype": "float32"}
    return out


def merge_template(onnx_path: Path, out: Path, adapter_names: list[str], data_name: str) -> None:
    """The inference graph without adapter branches, its weights pointing at ``data_name``.

    For each adapter the ``Add`` that joins the LoRA branch to the base output is bypassed;
    nodes that no longer feed an output are dropped. ``merge`` writes the folded weights at
    the same offsets, so the device needs no ONNX library to produce a merged model.
    """
    import onnx

    from edgetune.device.dora import NORM_PREFIX
    from edgetune.device.dora import modules as dora_modules

    proto = onnx.load(str(onnx_path), load_external_data=False)
    g = proto.graph
    consumers = consumers_of(g)
    dora = {m.path for m in dora_modules(adapter_names)}
    for b_name in (n for n in adapter_names if ".lora_B." in n):
        path = b_name.split(".lora_B.")[0]
        if path in dora:
            # DoRA's branch also reads the base output, so walk from the base weight instead:
            # the one Add that reads the base layer's output is the join.
            base_out = base_output(f"{path}.base_layer.weight", consumers)
            adds = [n for n in consumers.get(base_out, []) if n.op_type == "Add"]
            if len(adds) != 1:
                raise ModelError(f"cannot find where DoRA adapter {path} joins the base output")
            rewire(g, adds[0].output[0], base_out)
        else:
            add, seen = find_join(b_name, consumers)
            rewire(g, add.output[0], next(i for i in add.input if i not in seen))
    prune(g)
    lora = set(adapter_names) | {i.name for i in g.input if i.name.startswith(NORM_PREFIX)}
    kept_inputs = [i for i in g.input if i.name not in lora]
    del g.input[:]
    g.input.extend(kept_inputs)
    kept_inits = [i for i in g.initializer if i.name not in lora]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    relocate(g, data_name)
    onnx.save(proto, str(out))


def app_base_templates(onnx_path: Path, out_dir: Path, adapter_names: list[str], data_name: str) -> None:
    """Graphs for apps that load adapters at run time (ONNX Runtime >= 1.20 ``LoraAdapter``).

    The LoRA scale is removed from the graph (packed adapters carry it folded into B), and
    adapter weights stay overridable inputs whose defaults have no effect. One graph takes
    float32 adapters, one float16 (cast to float32 inside). Base weights point at ``data_name``
    at the same offsets as the bundle's inference data, so packing copies files only.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    for dtype in ("float32", "float16"):
        proto = onnx.load(str(onnx_path), load_external_data=False)
        g = proto.graph
        consumers = consumers_of(g)
        producers = {o: node for node in g.node for o in node.output}
        consts = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
        for b_name in (n for n in adapter_names if ".lora_B." in n):
            _, seen = find_join(b_name, consumers)
            for t in seen:
                node = producers.get(t)
                if node is not None and node.op_type == "Mul" and any(i in consts for i in node.input):
                    rewire(g, node.output[0], next(i for i in node.input if i not in consts))
        prune(g)
        lora = set(adapter_names)
        for init in g.initializer:
            if init.name in lora:  # adapter defaults go inline: small, and in the adapter dtype
                arr = numpy_helper.to_array(init, base_dir=str(onnx_path.parent))
                init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16 if dtype == "float16" else np.float32),
                                                      init.name))
        relocate(g, data_name)
        if dtype == "float16":
            cast_adapter_inputs(g, lora, helper, TensorProto)
        onnx.save(proto, str(out_dir / ("app_base_f16.onnx" if dtype == "float16" else "app_base.onnx")))


def cast_adapter_inputs(g: Any, lora: set[str], helper: Any, TensorProto: Any) -> None:
    """Adapter inputs become float16 ``NAME``; a Cast feeds the float32 graph as before."""
    casts = []
    for inp in g.input:
        if inp.name in lora:
            inp.type.tensor_type.elem_type = TensorProto.FLOAT16
            casts.append(helper.make_node("Cast", [inp.name], [inp.name + "/f32"], to=TensorProto.FLOAT,
                                          name=inp.name + "/cast"))
    for node in g.node:
        node.input[:] = [i + "/f32" if i in lora else i for i in node.input]
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)


def base_output(weight: str, consumers: dict[str, list[Any]]) -> str:
    """The output of the MatMul/Gemm that applies ``weight`` (through a Transpose, if any)."""
    t = weight
    for _ in range(4):
        nodes = consumers.get(t, [])
        if len(nodes) != 1:
            break
        node = nodes[0]
        if node.op_type in ("MatMul", "Gemm"):
            return node.output[0]
        if node.op_type not in ("Transpose", "Identity", "Cast"):
            break
        t = node.output[0]
    raise ModelError(f"cannot find the layer that applies {weight}")


def find_join(start: str, consumers: dict[str, list[Any]]) -> tuple[Any, set[str]]:
    seen, frontier = {start}, [start]
    while frontier:
        nxt = []
        for t in frontier:
            for node in consumers.get(t, []):
                if node.op_type == "Add":
                    return node, seen
                for o in node.output:
                    if o not in seen:
                        seen.add(o)
                        nxt.append(o)
        frontier = nxt
    raise ModelError(f"cannot find where adapter {start} joins the base output")


def prune(g: Any) -> None:
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del g.node[:]
    g.node.extend(reversed(keep))


