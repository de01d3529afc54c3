"""Export a Hugging Face model with adapters into an edgetune bundle (workstation side).

Needs torch, transformers, peft and onnx (``pip install edgetune[export]``). Every heavy
import lives inside a function so that importing this module on a device is harmless.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from edgetune.device import dora
from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats import quantized
from edgetune.formats.atomic import home
from edgetune.formats.config import AdapterConfig
from edgetune.formats.errors import ConfigError, ModelError
from edgetune.formats.models import ModelSpec, check_architecture, check_reference, resolve_model
from edgetune.workstation import bf16, dora_graph, dora_torch, extdata, graphs, optimizer_graph, variants, weights
from edgetune.workstation import gradients as autodiff
from edgetune.workstation import quantize as quant

OPSET = 17
Log = Callable[[str], None]


def _require_export_deps() -> None:
    missing = []
    for mod in ("torch", "transformers", "peft", "onnx"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ModelError(
            f"export needs {', '.join(missing)}; install the workstation extras: "
            "pip install torch==2.13.0 && pip install 'edgetune[export]'"
        )


def load_model(path: Path, log: Log = lambda s: None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer in float32 from a HF folder or a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_file() and path.suffix == ".gguf":
        path = _converted_gguf(path, log)
        check_architecture(_io.read_json(path / "config.json", "the model config"), path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                 use_safetensors=True)
    model.eval()
    return model, tok


def load_skeleton(path: Path, log: Log = lambda s: None) -> tuple[Any, Any, "weights.SourceWeights"]:
    """The model's structure without its weights, its tokenizer, and a reader of its weights.

    Every parameter is a placeholder that takes no memory (a scalar expanded to the
    parameter's shape); the weights are read from the checkpoint one tensor at a time when
    the graphs' data files are written. Buffers (rotary frequencies) are computed as usual.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if path.is_file() and path.suffix == ".gguf":
        path = _converted_gguf(path, log)
        check_architecture(_io.read_json(path / "config.json", "the model config"), path)
    source = weights.SourceWeights(path)
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    for mod in model.modules():
        for name, prm in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, torch.nn.Parameter(_placeholder(prm.shape), requires_grad=False))
    model.tie_weights()
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config)
    model.eval()
    return model, tok, source


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Modules built here keep their parameters on the meta device (no memory, no init work)
    and their buffers (rotary frequencies, embedding scales) on the CPU, computed as usual."""
    import torch

    orig = torch.nn.Module.register_parameter

    def register(self: Any, name: str, param: Any) -> None:
        orig(self, name, param)
        if param is not None:
            self._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = orig  # type: ignore[method-assign]


def _placeholder(shape: Any, value: float = 0.0) -> Any:
    import torch

    return torch.full((), value, dtype=torch.float32).expand(shape)


def _converted_gguf(gguf: Path, log: Log) -> Path:
    """Dequantize a GGUF once into a cached HF folder; later exports read it in a second.

    The conversion streams: one GGUF tensor at a time is dequantized, given transformers'
    per-architecture fix-ups (Llama's q/k row order) and name, and written to float32
    safetensors shards of at most 256 MB, so a 3.8B model's GGUF converts within about a GB of
    memory instead of the float model and a copy of it. The tensors are exactly those
    ``from_pretrained(..., gguf_file=...)`` builds (tests/test_real_model.py)."""
    digest = _io.sha256_file(gguf)
    out = home() / "converted" / digest[:16]
    if (out / "config.json").is_file():
        return out
    log(f"dequantizing {gguf.name} (once; cached in {out})")
    with _io.atomic_dir(out) as tmp:
        write_gguf_as_hf(gguf, tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}))
    return out


def gguf_tensors(gguf: Path) -> Iterator[tuple[str, Any]]:
    """(HF name, float32 array) of each weight of a GGUF, one at a time, named and fixed up
    as transformers' GGUF loader does."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _params_on_meta():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    reader = GGUFReader(str(gguf))
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    wanted = set(skeleton.state_dict())
    del skeleton
    with open(gguf, "rb") as f:
        for t in reader.tensors:
            # Read, not through the reader's memory map: mapped pages would count as this
            # process's memory until the end (the whole file's worth).
            f.seek(t.data_offset)
            raw = np.frombuffer(f.read(t.n_bytes), dtype=t.data.dtype).reshape(t.data.shape)
            result = processor.process(weights=dequantize(raw, t.tensor_type), name=t.name,
                                       tensor_key_mapping=mapping, parsed_parameters=parsed)
            name = mapping.get(result.name)
            if name is not None and name in wanted:
                yield name, np.ascontiguousarray(result.weights, dtype=np.float32)


def _write_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    """A float32 safetensors file written straight from the arrays (``safetensors.numpy.save_file``
    first copies every tensor into a bytes object: twice the shard in memory)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, a in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in tensors.values():
            f.write(memoryview(a).cast("B"))


def write_gguf_as_hf(gguf: Path, out: Path, shard_bytes: int = 256 << 20) -> None:
    """A HF folder (config, generation config, tokenizer, float32 safetensors shards) from a GGUF,
    streamed tensor by tensor (see :func:`_converted_gguf`)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = "float32"
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    shards: list[dict[str, Any]] = [{}]
    size = 0
    files: list[Path] = []
    shard_names: list[list[str]] = []

    def flush() -> None:
        if shards[-1]:
            shard_names.append(list(shards[-1]))
            f = out / f"part-{len(files):05d}.safetensors"
            _write_safetensors(f, shards[-1])
            files.append(f)
            shards[-1] = {}

    for name, w in gguf_tensors(gguf):
        if size and size + w.nbytes > shard_bytes:
            flush()
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    flush()
    weight_map = {}
    n = len(files)
    for k, (f, names) in enumerate(zip(files, shard_names)):
        final = out / ("model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors")
        f.rename(final)
        weight_map.update({key: final.name for key in names})
    if n > 1:
        total = sum((out / v).stat().st_size for v in set(weight_map.values()))
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def resolve_targets(targets: tuple[str, ...], spec: ModelSpec | None, model: Any) -> tuple[str, ...]:
    """Expand ``all-linear`` and check every target names a linear layer in the model."""
    import torch

    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear.discard("lm_head")
    if targets == ("all-linear",):
        return tuple(spec.all_linear) if spec else tuple(sorted(linear))
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise ConfigError(f"target module(s) {', '.join(unknown)} not in the model; linear layers: {', '.join(sorted(linear))}")
    return targets


def inject_adapter(model: Any, cfg: AdapterConfig) -> Any:
    """Wrap ``model`` with a PEFT adapter as ``cfg`` describes, seeded for reproducible init."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, variants.get(cfg.method).peft_config(cfg))
    peft_model.eval()
    return peft_model


class _Names:
    """Graph input/output names shared by the exporter and the runtime."""

    train_inputs = ["input_ids", "attention_mask", "labels", "label_norm"]


def segment_attention(body: Any, segments: Any) -> tuple[Any, Any]:
    """The training graph's attention masks and positions from its ``attention_mask`` input read as
    segment ids: 0 for padding, and 1, 2, ... numbering the records packed into a row (a plain 0/1
    padding mask is the one-record case). A token sees the earlier tokens of its own record only,
    and its position counts from its record's start, so a row of packed records computes what each
    record computes alone (sequence packing, :func:`edgetune.device.data.pack`).

    Returns the additive float masks as the model takes them ready-made (one 4D mask, or one per
    layer type for models whose layers alternate full and sliding-window attention), with the
    sliding window applied as transformers' own masks apply it (a key at most ``window - 1``
    positions back), and the ``[B, S]`` positions."""
    import inspect

    import torch

    n = segments.shape[1]
    idx = torch.arange(n, device=segments.device)
    same = segments[:, :, None] == segments[:, None, :]
    before = idx[None, :] < idx[:, None]  # [query, key]: the key is earlier
    positions = (same & before[None]).sum(-1)
    see = same & (before | (idx[None, :] == idx[:, None]))[None] & (segments[:, None, :] > 0)
    lowest = torch.finfo(torch.float32).min
    cfg = body.config
    window = getattr(cfg, "sliding_window", None)

    def additive(allowed: Any) -> Any:
        return torch.where(allowed, torch.zeros((), dtype=torch.float32),
                           torch.full((), lowest, dtype=torch.float32))[:, None]

    def windowed() -> Any:
        near = (idx[:, None] - idx[None, :]) < int(window)
        return additive(see & near[None])

    forward = inspect.getsource(type(body).forward)
    if "causal_mask_mapping := attention_mask, dict" in forward:  # per layer type (Gemma-2, Qwen2)
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        full = additive(see)
        return {k: (windowed() if k == "sliding_attention" and window else full) for k in kinds}, positions
    if window and "create_sliding_window_causal_mask" in forward:  # one windowed mask (Mistral, Phi-3)
        return windowed(), positions
    return additive(see), positions


def _train_wrapper(peft_model: Any, dora_mods: list | None = None) -> Any:
    import torch
    import torch.nn.functional as F

    class TrainForward(torch.nn.Module):
        """Causal-LM loss over labelled positions only.

        ``labels`` are already shifted (labels[t] is the token after position t). Only the
        labelled rows reach the vocabulary projection, which saves most of its cost.
        The loss is a sum divided by ``label_norm`` so accumulated micro-batches give the
        token-weighted mean of the whole batch. DoRA weight norms, if any, follow as inputs.
        """

        def __init__(self, pm: Any) -> None:
            super().__init__()
            self.pm = pm

        def forward(self, input_ids, attention_mask, labels, label_norm, *norms):  # type: ignore[no-untyped-def]
            dora_torch.set_norms(dora_mods or [], norms)
            lm = self.pm.base_model.model
            masks, positions = segment_attention(lm.model, attention_mask)
            hidden = lm.model(input_ids=input_ids, attention_mask=masks, position_ids=positions,
                              use_cache=False).last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1])
            lab = labels.reshape(-1)
            idx = torch.nonzero(lab != -100).squeeze(-1)
            logits = lm.lm_head(flat.index_select(0, idx))
            cap = getattr(lm.config, "final_logit_softcapping", None)
            if cap:  # Gemma-2: the loss sees the capped logits, as inference does
                logits = torch.tanh(logits / cap) * cap
            return F.cross_entropy(logits, lab.index_select(0, idx), reduction="sum") / label_norm

    return TrainForward(peft_model)


def _kv_wrapper(peft_model: Any, num_layers: int, dora_mods: list | None = None) -> Any:
    import torch
    from transformers import DynamicCache

    config = peft_model.base_model.model.config

    class KVForward(torch.nn.Module):
        """Logits and the updated KV cache; past keys/values come in as flat tensors."""

        def __init__(self, pm: Any) -> None:
            super().__init__()
            self.pm = pm

        def forward(self, input_ids, attention_mask, position_ids, *rest):  # type: ignore[no-untyped-def]
            past, norms = rest[: 2 * num_layers], rest[2 * num_layers:]
            dora_torch.set_norms(dora_mods or [], norms)
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)], config=config)
            out = self.pm.base_model.model(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, past_key_values=cache, use_cache=True)
            flat = []
            for layer in out.past_key_values.layers[:num_layers]:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return KVForward(peft_model)


class _Traceable:
    """While tracing, every parameter is a distinct placeholder: the exporter merges graph
    inputs with equal values (every zero-initialized lora_B is equal), which would tie tensors
    together. Parameters become graph inputs (no weight is serialized); :func:`_attach` turns
    them into initializers afterwards."""

    def __init__(self, peft_model: Any) -> None:
        self.pm = peft_model
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> "_Traceable":
        for i, (n, p) in enumerate(self.pm.named_parameters()):
            self.saved[n] = p.data
            p.data = _placeholder(p.shape, 1.0 + i / 1024)
        return self

    def __exit__(self, *exc: Any) -> None:
        for n, p in self.pm.named_parameters():
            p.data = self.saved[n]


def _attach(proto: Any, peft_model: Any, source: "weights.SourceWeights") -> dict[str, extdata.Loader]:
    """Parameter inputs of a freshly traced graph become initializers: adapters with their
    values, base weights as placeholders read from ``source`` when the data file is written.
    Returns the loaders of those placeholders."""
    from onnx import TensorProto, numpy_helper

    params = dict(peft_model.named_parameters())
    load = source_loader(source)
    lazy: dict[str, extdata.Loader] = {}
    kept = []
    for inp in proto.graph.input:
        p = params.get(inp.name)
        if p is None:
            kept.append(inp)
            continue
        if p.requires_grad:
            proto.graph.initializer.append(numpy_helper.from_array(p.detach().numpy().astype("float32"), inp.name))
        else:
            t = TensorProto(name=inp.name, data_type=TensorProto.FLOAT)
            t.dims.extend(p.shape)
            proto.graph.initializer.append(t)
            lazy[inp.name] = functools.partial(load, inp.name)
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    return lazy


def _base_weight(source: "weights.SourceWeights", name: str, cfg: AdapterConfig) -> Any:
    """A DoRA layer's frozen weight as the graphs compute it: with a quantized base, the
    dequantized one (as PEFT's DoRA does on a bitsandbytes base)."""
    w = source.get(graphs.hf_name(f"{name}.base_layer.weight"))
    if cfg.quantize:
        bits = quantized.BITS[cfg.quantize]
        w = quantized.dequantize(*quantized.quantize(w, bits, cfg.block_size), bits, w.shape[1])
    return w


def init_dora(peft_model: Any, source: "weights.SourceWeights", cfg: AdapterConfig) -> None:
    """DoRA magnitudes as PEFT initializes them (the row norms of ``W + s B A``), from the
    checkpoint's weights, one layer at a time."""
    import torch

    with torch.no_grad():
        for name, mod in dora_torch.torch_modules(peft_model):
            w = torch.from_numpy(_base_weight(source, name, cfg))
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            norm = torch.linalg.norm(w + mod.scaling["default"] * (b @ a), dim=1)
            mod.lora_magnitude_vector["default"].weight.copy_(norm)


def _initial_norms(mods: list[tuple[str, Any]], source: "weights.SourceWeights", cfg: AdapterConfig) -> list[Any]:
    import torch

    out = []
    for name, mod in mods:
        w = _base_weight(source, name, cfg)
        a = mod.lora_A["default"].weight.detach().float().numpy()
        b = mod.lora_B["default"].weight.detach().float().numpy()
        out.append(torch.from_numpy(dora.row_norms(w, a, b, float(mod.scaling["default"]))))
    return out


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """The tracer warns about data-dependent branches in transformers' cache code; the
    graphs are checked against torch by the tests, so users need not see the noise."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Warning, module=r"(torch|transformers|peft)(\.|$)")
        yield


def _trace(wrapper: Any, args: tuple, path: Path, input_names: list[str], output_names: list[str],
           dyn: dict[str, dict[int, str]], training: Any) -> Any:
    """Trace ``wrapper`` with parameters as graph inputs (no weight is serialized) and return
    the graph with PEFT's names."""
    import onnx
    import torch

    # The exporter's whole-graph shape pass serializes every parameter's values for every node;
    # parameters are graph inputs with their shapes here, so it runs without their values.
    whole_graph = torch._C._jit_pass_onnx_graph_shape_type_inference

    def shapes_only(graph: Any, params: Any, opset: int) -> Any:
        return whole_graph(graph, {}, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = shapes_only
    try:
        torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=input_names, output_names=output_names,
                          dynamic_axes=dyn, opset_version=OPSET, do_constant_folding=False, training=training,
                          export_params=False)
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = whole_graph
    proto = onnx.load(str(path))
    path.unlink()
    graphs.strip_prefix(proto)
    return proto


def export_train_graph(peft_model: Any, path: Path, source: "weights.SourceWeights",
                       seq: int = 16) -> tuple[Any, dict[str, extdata.Loader]]:
    """Trace the loss graph with dynamic batch and sequence axes; returns it with the loaders
    of its base weights (see :func:`_attach`)."""
    import torch

    ids = torch.randint(3, 100, (2, seq))
    mask = torch.ones(2, seq, dtype=torch.int64)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    dyn = {n: {0: "batch", 1: "seq"} for n in _Names.train_inputs[:3]}
    mode = torch.onnx.TrainingMode.TRAINING if _has_dropout(peft_model) else torch.onnx.TrainingMode.EVAL
    with _quiet_tracing(), dora_torch.norms_from_inputs(peft_model) as mods:
        norms = [torch.ones(mod.base_layer.weight.shape[0]) for _, mod in mods]
        norm_names = [dora.DoraModule(n).norm_input for n, _ in mods]
        wrapper = _train_wrapper(peft_model, mods)
        with _Traceable(peft_model):
            proto = _trace(wrapper, (ids, mask, labels, torch.tensor(float(seq), dtype=torch.float32), *norms), path,
                           _Names.train_inputs + norm_names, ["loss"], dyn, mode)
    return proto, _attach(proto, peft_model, source)


def _has_dropout(peft_model: Any) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for n, m in peft_model.named_modules() if "lora_dropout" in n)


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_infer_graph(peft_model: Any, path: Path, adapter_names: list[str], source: "weights.SourceWeights",
                       adapter: AdapterConfig) -> tuple[Any, dict[str, Any], dict[str, extdata.Loader]]:
    """Trace the KV-cache inference graph; adapter weights become overridable inputs.
    Returns the graph, its KV-cache description and the loaders of its base weights."""
    import torch
    from onnx import numpy_helper

    cfg = peft_model.base_model.model.config
    layers = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ins, outs = kv_names(layers)
    ids = torch.randint(3, 100, (1, 4))
    past = [torch.zeros(1, kv_heads, 0, head_dim) for _ in range(2 * layers)]
    dyn: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                                      "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    dyn.update({n: {0: "batch", 2: "past"} for n in ins[3:]})
    dyn.update({n: {0: "batch", 2: "total"} for n in outs[1:]})
    with _quiet_tracing(), torch.no_grad(), dora_torch.norms_from_inputs(peft_model) as mods:
        norms = _initial_norms(mods, source, adapter)
        norm_names = [dora.DoraModule(n).norm_input for n, _ in mods]
        wrapper = _kv_wrapper(peft_model, layers, mods)
        with _Traceable(peft_model):
            proto = _trace(wrapper, (ids, torch.ones(1, 4, dtype=torch.int64), torch.arange(4)[None], *past, *norms),
                           path, ins + norm_names, outs, dyn, torch.onnx.TrainingMode.EVAL)
    lazy = _attach(proto, peft_model, source)
    graphs.expose_as_inputs(proto, adapter_names)
    # DoRA norms default to those of the untrained adapter, so the graph runs as the base model.
    for name, value in zip(norm_names, norms):
        proto.graph.initializer.append(numpy_helper.from_array(value.numpy(), name))
    kv = {"num_layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "inputs": ins + norm_names,
          "outputs": outs}
    return proto, kv, lazy


def _probe_feeds(proto: Any, vocab: int) -> list[dict[str, Any]]:
    """Two small batches of different shapes, for the gradient builder's shape probe."""
    import numpy as np

    feeds = []
    for seed, (rows, seq) in enumerate(((2, 7), (3, 5))):
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, vocab, (rows, seq))
        labels = ids.copy()
        labels[:, : seq // 2] = -100
        feed = {"input_ids": ids, "attention_mask": np.ones((rows, seq), np.int64), "labels": labels,
                "label_norm": np.array(float(seq), np.float32)}
        for inp in proto.graph.input:
            if inp.name.startswith(dora.NORM_PREFIX):
                feed[inp.name] = np.ones([d.dim_value for d in inp.type.tensor_type.shape.dim], np.float32)
        feeds.append(feed)
    return feeds


def build_training(forward_onnx: Path, trainable: list[str], out: Path, vocab: int,
                   recompute: bool = False, log: Log = lambda s: None) -> dict[str, Any]:
    """``train.onnx`` (loss and adapter gradients), ``eval.onnx`` (loss) sharing one weight
    file, and ``adapter_init.safetensors``: only ``trainable`` tensors get gradients.
    ``forward_onnx`` keeps its weights in ``train.onnx.data`` beside it; the tensors the
    gradient builder adds go at the end of that file. Then the fused graphs (:func:`build_fused`);
    returns the manifest's ``fused`` entry."""
    import onnx

    proto = onnx.load(str(forward_onnx), load_external_data=False)
    tg = autodiff.build(proto, trainable, "loss", _probe_feeds(proto, vocab), base_dir=forward_onnx.parent,
                        recompute=recompute)
    onnx.save_model(tg.model, str(out / "train.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="train.onnx.data", size_threshold=1024)
    forward = tg.forward  # the forward graph with the adapters as inputs
    graphs.disable_dropout(forward)
    graphs.share_external_data(forward, out / "train.onnx")
    onnx.save(forward, str(out / "eval.onnx"))
    from safetensors.numpy import save

    _io.write_bytes(out / "adapter_init.safetensors", save({n: v.astype("float32") for n, v in tg.initial.items()}))
    onnx.save(optimizer_graph.build(trainable, {n: list(v.shape) for n, v in tg.initial.items()}),
              str(out / "optimizer.onnx"))
    return build_fused(forward_onnx, trainable, out, vocab, recompute, log)


def build_fused(forward_onnx: Path, trainable: list[str], out: Path, vocab: int, recompute: bool = False,
                log: Log = lambda s: None) -> dict[str, Any]:
    """``train_fused.onnx`` and ``eval_fused.onnx``: the same graphs with the ``edgetune`` domain's
    fused kernels (:mod:`edgetune.workstation.gradients.fused`), reading the plain graphs' weight
    file. Built when the kernel library loads here; returns the manifest's ``fused`` entry
    (``{}`` when there is none)."""
    import onnx

    from edgetune.device import fused as kernels

    lib = kernels.library()
    if not lib.ok or kernels.mode() == "plain":
        log(f"no fused graphs: {lib.reason or 'EDGETUNE_KERNELS=plain'}")
        return {}
    proto = onnx.load(str(forward_onnx), load_external_data=False)
    tg = autodiff.build(proto, trainable, "loss", _probe_feeds(proto, vocab), base_dir=forward_onnx.parent,
                        recompute=recompute, fused=True)
    for model in (tg.model, tg.forward):  # bfloat16 frozen weights (--compute bf16): their products in MatMulBF16
        bf16.fuse(model, kernels.DOMAIN)
    ops: dict[str, int] = {}
    for n in tg.model.graph.node:
        if n.domain == kernels.DOMAIN:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    if not ops:
        log("no fused graphs: none of the fused kernels' patterns occurs in this model")
        return {}
    log("fused graphs: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()) if not k.endswith("Grad")))
    # Weights stay in the plain graph's file (its bytes, and so the base id, do not change); the
    # few tensors the fused build adds are small and stay inline.
    for model, name in ((tg.model, "train_fused.onnx"), (tg.forward, "eval_fused.onnx")):
        if model is tg.forward:
            graphs.disable_dropout(model)
        graphs.share_external_data(model, out / "train.onnx")
        onnx.save(model, str(out / name))
    entry = {"train": "train_fused.onnx", "eval": "eval_fused.onnx", "abi": kernels.ABI, "ops": ops}
    if not lib.lacks({"AdamW"}):
        # The optimizer step as one AdamW call; the same bits as optimizer.onnx (its own entry: a
        # library without the op still runs the fused training graphs with the plain optimizer).
        onnx.save(optimizer_graph.build(trainable, {n: list(v.shape) for n, v in tg.initial.items()}, fused=True),
                  str(out / "optimizer_fused.onnx"))
        entry["optimizer"] = "optimizer_fused.onnx"
    return entry


def stop_token_ids(gen: dict[str, Any], eos_id: int | None) -> list[int]:
    """Every token that ends a reply: the generation config's eos id(s) (a list for models with
    an end-of-turn token, e.g. Llama-3's ``<|eot_id|>``, Phi-3's ``<|end|>``) and the tokenizer's."""
    ids = gen.get("eos_token_id")
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({int(i) for i in ids} | ({int(eos_id)} if eos_id is not None else set()))


def _generation_config(hf: Any) -> dict[str, Any]:
    gen = getattr(hf, "generation_config", None)
    return {k: v for k, v in (gen.to_dict() if gen is not None else {}).items()
            if v is not None and not k.startswith("_")}


def _write_tokenizer(tok: Any, out: Path, gen: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "tokenizer.json", out / "tokenizer.json")
        if (Path(tmp) / "tokenizer_config.json").is_file():
            shutil.copy(Path(tmp) / "tokenizer_config.json", out / "hf_tokenizer_config.json")
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if template:
        (out / "chat_template.jinja").write_text(template)
    meta = {
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token or tok.eos_token,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        "chat_template": "chat_template.jinja" if template else None,
        "stop_token_ids": stop_token_ids(gen, tok.eos_token_id),
    }
    _io.write_json(out / "tokenizer_meta.json", meta)
    return meta


def export(model: str | os.PathLike | None, out: str | os.PathLike, cfg: AdapterConfig,
           log: Log = lambda s: None, overwrite: bool = False) -> Path:
    """Export ``model`` with the adapter ``cfg`` into a bundle directory ``out``."""
    check_reference(model)  # a wrong name or path is named before torch is even looked for
    _require_export_deps()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    t0 = time.time()
    with _quiet_tracing():
        return _export(model, out, cfg, log, t0)


def _export(model: str | os.PathLike | None, out: Path, cfg: AdapterConfig, log: Log, t0: float) -> Path:
    import onnx

    path, spec = resolve_model(model)
    log(f"loading {spec.name if spec else path}")
    hf, tok, source = load_skeleton(path, log)
    targets = resolve_targets(cfg.targets, spec, hf)
    cfg = AdapterConfig(**{**cfg.to_dict(), "targets": targets})
    hf_names = set(hf.state_dict())
    pm = inject_adapter(hf, cfg)
    init_dora(pm, source, cfg)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    norm_inputs = [m.norm_input for m in dora.modules(trainable)]
    with _io.atomic_dir(out) as tmp:
        log(f"tracing the training and inference graphs ({len(trainable)} adapter tensors)")
        fwd, fwd_lazy = export_train_graph(pm, tmp / "_forward.onnx", source)
        infer, kv, infer_lazy = export_infer_graph(pm, tmp / "_infer.onnx", trainable, source, cfg)
        qnames: list[str] = []
        if cfg.quantize:
            bits = quantized.BITS[cfg.quantize]
            in_infer = quant.linear_weights(infer.graph, set(trainable + norm_inputs))
            in_train = set(quant.linear_weights(fwd.graph, set(trainable)))
            qnames = [n for n in in_infer if n in in_train]
            quant.rewrite(fwd, qnames, None, bits, cfg.block_size, compute=cfg.compute)
            for n in qnames:
                fwd_lazy.update(extdata.Quantized(source_loader(source), bits, cfg.block_size).loaders(
                    n, transposed=cfg.compute == "int8"))
        if cfg.compute == "bf16":
            bnames = quant.linear_weights(fwd.graph, set(trainable))
            vocab = bf16.vocab_weights(fwd.graph, set(trainable) | set(bnames))
            bf16.rewrite(fwd, bnames + vocab, fwd_lazy)
            log(f"{len(bnames)} frozen linear weights" + (" and the vocabulary projection's" if vocab else "")
                + " in bfloat16 in the training graphs")
        log("writing the training weights")
        extdata.write_external(fwd, tmp / "_forward.onnx", "train.onnx.data", fwd_lazy, threshold=1024)
        del fwd
        log("building the training graph (gradients of the adapter weights)")
        fused = build_training(tmp / "_forward.onnx", trainable, tmp, int(hf.config.vocab_size),
                               cfg.gradient_checkpointing, log)
        (tmp / "_forward.onnx").unlink()
        norms = dora_graph.build(tmp / "train.onnx", trainable, cfg.scale,
                                 {"bits": quantized.BITS[cfg.quantize], "block_size": cfg.block_size} if cfg.quantize else None)
        if norms is not None:
            onnx.save(norms, str(tmp / "dora_norms.onnx"))
        log("writing the inference graph and weights")
        qinfo = None
        if cfg.quantize:
            # The merge template stays float (a QLoRA adapter merges into a float base): its layout is
            # that of the float inference weights, which are never written.
            float_infer = onnx.ModelProto()
            float_infer.CopyFrom(infer)
            extdata.write_external(float_infer, tmp / "_float_infer.onnx", "infer.onnx.data", infer_lazy,
                                   threshold=0, dry=True)
            del float_infer
            index = graphs.weights_index(tmp / "_float_infer.onnx", hf_names)
            graphs.merge_template(tmp / "_float_infer.onnx", tmp / "merge_template.onnx", trainable, "model.onnx.data")
            (tmp / "_float_infer.onnx").unlink()
            merge_layout = graphs.external_index(tmp / "merge_template.onnx")
            qz = extdata.Quantized(source_loader(source), bits, cfg.block_size)
            quant.rewrite(infer, qnames, None, bits, cfg.block_size, inference=True)
            for n in qnames:
                infer_lazy.pop(n, None)
                infer_lazy.update(qz.loaders(n))
            extdata.write_external(infer, tmp / "infer.onnx", "infer.onnx.data", infer_lazy, threshold=0)
            log(f"quantized {len(qnames)} linear weights to {cfg.quantize} (blocks of {cfg.block_size}): "
                f"{qz.float_bytes / 2**20:.0f} MB -> {qz.quantized_bytes / 2**20:.0f} MB")
            qinfo = {"method": cfg.quantize, "bits": bits, "block_size": cfg.block_size, "compute": cfg.compute,
                     "weights": sorted(qnames),
                     "float_bytes": qz.float_bytes, "quantized_bytes": qz.quantized_bytes,
                     "max_relative_error": qz.max_relative_error, "merge_layout": merge_layout,
                     "infer_weights": graphs.external_index(tmp / "infer.onnx")}
        else:
            extdata.write_external(infer, tmp / "infer.onnx", "infer.onnx.data", infer_lazy, threshold=0)
            index = graphs.weights_index(tmp / "infer.onnx", hf_names)
            graphs.merge_template(tmp / "infer.onnx", tmp / "merge_template.onnx", trainable, "model.onnx.data")
        del infer
        # DoRA's norms are adapter inputs too: an app feeds the ones packed with the adapter.
        graphs.app_base_templates(tmp / "infer.onnx", tmp, trainable + norm_inputs, "base.onnx.data")
        _io.write_json(tmp / "hf_config.json", hf.config.to_dict())
        gen = _generation_config(hf)
        _io.write_json(tmp / "generation_config.json", gen)
        tok_meta = _write_tokenizer(tok, tmp, gen)
        train_weights = graphs.external_index(tmp / "train.onnx")
        manifest = _bundle.make_manifest(
            tmp, source=str(spec.name if spec else path), source_sha256=(spec.sha256 if spec else None),
            adapter=cfg, trainable=trainable, kv=kv, tokenizer=tok_meta, hf_config=hf.config.to_dict(),
            shapes={n: list(p.shape) for n, p in pm.named_parameters() if p.requires_grad}, weights=index, train_weights=train_weights,
        )
        if qinfo:
            if cfg.compute == "int8":  # the int8 copies of W^T the training graphs read, besides the codes
                qinfo["transposed_bytes"] = sum(train_weights[t]["length"] for n in qnames
                                                for t in quantized.tensor_names(n, copy=True) if t in train_weights)
            manifest["quantization"] = qinfo
        if fused:
            manifest["fused"] = fused
        # The graphs read attention_mask as segment ids (segment_attention): rows may be packed.
        manifest["packing"] = {"version": 1, "attention_mask": "segments"}
        manifest["optimizer"] = {"file": "optimizer.onnx", "rule": "adamw", "betas": list(optimizer_graph.BETAS),
                                 "eps": optimizer_graph.EPS, "schedules": optimizer_graph.SCHEDULES}
        manifest["app_training"] = app_training(manifest, norms is not None)
        _io.write_json(tmp / _bundle.MANIFEST, _io.seal(manifest))
    log(f"bundle written to {out} in {time.time() - t0:.0f}s")
    return out


def app_training(manifest: dict[str, Any], has_norms: bool) -> dict[str, Any]:
    """The manifest's ``app_training`` entry: what a trainer without Python (``examples/cpp``, an app
    through any ONNX Runtime binding) needs besides the graphs' own inputs and outputs: which graphs
    to run, the constant feeds, and the PEFT ``adapter_config.json`` to write beside the adapter with
    the checksum edgetune checks when it reads the adapter back."""
    from edgetune.formats import peft_io

    q = manifest.get("quantization")
    feeds = {quantized.RUNTIME_SHIFT: {"dtype": "uint8", "value": int(quantized.runtime_feeds(int(q["bits"]))[
        quantized.RUNTIME_SHIFT])}} if q else {}
    a = dict(manifest["adapter"])
    a["targets"] = tuple(a["targets"])
    peft = peft_io.peft_config(AdapterConfig(**a), str(manifest.get("source")))
    return {"version": APP_TRAINING_VERSION, "train": "train.onnx", "eval": "eval.onnx", "optimizer": "optimizer.onnx",
            "dora_norms": "dora_norms.onnx" if has_norms else None, "feeds": feeds,
            "peft_config": peft, "peft_config_sha256": peft_io.config_sha256(peft)}


APP_TRAINING_VERSION = 1


def source_loader(source: "weights.SourceWeights") -> Callable[[str], Any]:
    """Graph weight name -> its float32 value from the checkpoint."""
    return lambda name: source.get(graphs.hf_name(name))
