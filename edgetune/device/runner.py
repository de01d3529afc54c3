"""Training steps on the installed onnxruntime: sessions, parameters, gradients, optimizer
state and checkpoints. The trainer loop above knows nothing of how a step runs.

The bundle's ``train.onnx`` is plain ONNX (see ``edgetune.workstation.gradients``): the adapter tensors
are graph inputs and their gradients graph outputs, so any onnxruntime build, on any
platform and with any execution provider, runs it. Checkpoints: ``edgetune.formats.run``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgetune.device import fused as kernels
from edgetune.device import providers as devices
from edgetune.device.optim import AdamW, GraphAdamW
from edgetune.formats import bundle as _bundle
from edgetune.formats import quantized
from edgetune.formats.errors import BundleError, DeviceError
from edgetune.formats.run import ADAPTER_FILE, OPTIMIZER_FILE, read_tensors, write_checkpoint


def session_options(threads: int = 0, shared: Mapping[str, Any] | None = None, arena: bool = False,
                    prepack: bool = False) -> Any:
    """Options of the training and eval sessions; ``shared`` initializers are used in place.
    ``prepack`` lets ONNX Runtime pack weights when the session loads: a ``compute int8`` bundle's
    ``MatMulNBits`` run their int8 kernels only on packed weights (unpacked, they dequantize)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Denormal adapter gradients are numerically nil but slow on x86.
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    # Each frozen weight feeds a forward and a backward MatMul: pre-packing would keep two packed
    # copies beside the mapped file (+1.3 GB for SmolLM2); packing per call measured no slower.
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    # ORT's arena or the system's malloc: see use_arena.
    so.enable_cpu_mem_arena = arena
    # ONNX Runtime's memory patterns lay out one block per input shape from the first run's
    # allocations, without reusing the space of tensors freed during the run: on the default
    # model's 1,024-token chunks that was 1.3 GB over the live peak from the second run of a shape on.
    so.enable_mem_pattern = False
    # Run shape nodes as soon as their input exists and otherwise keep the graph's order: the
    # backward pass's shape reads then do not keep forward activations alive (-0.4 GB there).
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    for name, value in (shared or {}).items():
        so.add_initializer(name, value)
    if threads:
        so.intra_op_num_threads = threads
    return so


def use_arena() -> bool:
    """ORT's arena, shrunk after every run (:func:`run_options`), unless ``EDGETUNE_ORT_ARENA=0``
    asks for the system's malloc.

    Measured on the default model (float32 base, 1,024-token chunks of varied shapes, with memory
    patterns off and the priority-based order): peak 2.15-2.2 GB with the shrunk arena, 2.4 GB with
    the arena unshrunk, 2.5 GB with glibc's malloc (its heap holds freed blocks it cannot hand
    back); the same speed. On the Phi-3-mini-shaped int4 model (bench/scale.py, checkpointed, batch
    1 x 256), whose backward allocates a float32 copy of each 37-201 MB weight for a moment: 4.9-5.0 GB
    with the shrunk arena at 3.5-4.4 tokens/s over two runs, 6.1 GB with malloc at 4.3-4.6 tokens/s
    (the unshrunk arena grew 5.0 -> 6.0 -> 7.9 GB over three steps). Memory is what a device runs
    out of first."""
    forced = os.environ.get("EDGETUNE_ORT_ARENA")
    return forced != "0"


def tune_allocator(mmap_threshold: int = 32 << 20) -> None:
    """Without ORT's arena, tensors come from malloc: on glibc, serve those up to 32 MB from the
    heap and keep 256 MB of freed memory for the next chunk, instead of mapping fresh zeroed
    pages for each (measured: 40 % fewer page faults, speed back to the arena's, peak RSS
    still 0.6 GB under it). Elsewhere the system allocator's defaults stay."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        forced = os.environ.get("EDGETUNE_MMAP_THRESHOLD")
        libc.mallopt(-3, int(forced) if forced else mmap_threshold)  # M_MMAP_THRESHOLD (no dynamic adjustment)
    except (OSError, AttributeError):
        pass  # not glibc (musl, Android's bionic): keep the defaults


class _Shared(dict):
    """Initializer name -> OrtValue, and the memory maps they view (``maps``)."""

    maps: dict[str, np.memmap]


def shared_weights(b: _bundle.Bundle) -> dict[str, Any]:
    """The frozen weights as OrtValues over one read-only memory map of ``train.onnx.data``:
    the training and eval sessions read the same pages instead of a copy each."""
    import onnxruntime as ort

    index = b.manifest.get("train_weights") or {}
    maps: dict[str, np.memmap] = {}
    out = _Shared()
    out.maps = maps
    for name, e in index.items():
        if e["file"] not in maps:
            maps[e["file"]] = np.memmap(b.path(e["file"]), dtype=np.uint8, mode="r")
        raw = maps[e["file"]][e["offset"]: e["offset"] + e["length"]]
        if e["dtype"] == "bfloat16":  # numpy has no bfloat16: its bits, typed by ONNX Runtime
            make = getattr(ort.OrtValue, "ortvalue_from_numpy_with_onnx_type", None)
            if make is not None:
                out[name] = make(np.frombuffer(raw, np.uint16).reshape(e["shape"]), 16)  # TensorProto.BFLOAT16
            continue  # an older ONNX Runtime loads these itself
        out[name] = ort.OrtValue.ortvalue_from_numpy(np.frombuffer(raw, e["dtype"]).reshape(e["shape"]))
    return out


def release_pages(shared: Mapping[str, Any]) -> None:
    """Drop this process's resident pages of the mapped weight file (``MADV_DONTNEED``; the file
    is read-only, so a page read again comes back from it). After a pre-packing session loads,
    its packed copies are what the products read: the quantized codes' pages stay out of the RSS."""
    import mmap

    for m in getattr(shared, "maps", {}).values():  # one map per weight file
        mm = getattr(m, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def _missing_op(message: str) -> str | None:
    """The op an ONNX Runtime load error says it has no kernel or schema for, if that is the error."""
    import re

    m = re.search(r"([\w.:]+)\(-?\d+\) is not a registered function/op", message) or \
        re.search(r"Could not find an implementation for (\w+)\(", message)
    return m.group(1) if m else None


def run_options(arena: bool) -> Any:
    """With ORT's arena, hand the arena's free regions back to the system after every run, so
    that chunks of different shapes do not pile up dead space (the arena's weakness without it)."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    if arena:
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


class StepRunner:
    """Forward and backward passes of one bundle on one device, with AdamW on the adapters."""

    def __init__(self, b: _bundle.Bundle, device: devices.Device, threads: int = 0,
                 weight_decay: float = 0.01) -> None:
        self.bundle = b
        self.device = device
        self.threads = threads
        tune_allocator()
        self._shared = shared_weights(b)
        # A quantized base's graphs take the dequant's run-time input (see edgetune.formats.quantized).
        q = b.manifest.get("quantization") or {}
        self._runtime = quantized.runtime_feeds(int(q["bits"])) if q else {}
        self._prepack = q.get("compute") == "int8"
        self.arena = use_arena()
        self._run_opts = run_options(self.arena)
        self.kernel_info = "plain"  # or "fused (ISA)": which graphs run, for run.json and the log
        self._graphs = {"train": "train.onnx", "eval": "eval.onnx"}
        self.train_sess = self._open_train()
        self._eval_sess: Any = None
        self.params: dict[str, np.ndarray] = read_tensors(b.path("adapter_init.safetensors"))
        self._check_params(self.params, b.path("adapter_init.safetensors"))
        self.grads: dict[str, np.ndarray] = {}
        # The bundle's optimizer graph (what an app runs) where there is one; numpy for older bundles.
        opt = b.manifest.get("optimizer") or {}
        self.optimizer = self._optimizer(opt, weight_decay) if opt else AdamW(weight_decay=weight_decay)
        self._grad_names = [p + "_grad" for p in b.trainable]
        # DoRA's weight norms as a graph (what an app runs); numpy (edgetune.device.dora) for older bundles.
        norms = (b.manifest.get("app_training") or {}).get("dora_norms")
        self._norms_sess = self._norms_session(norms) if norms else None

    def _optimizer(self, opt: dict[str, Any], weight_decay: float) -> GraphAdamW:
        """The optimizer graph: its one-call form (``edgetune.AdamW``, the same bits) beside the
        fused training graph when the library has the op, else ``optimizer.onnx``."""
        name = (self.bundle.manifest.get("fused") or {}).get("optimizer")
        if name and self.kernel_info != "plain" and not kernels.library().lacks({"AdamW"}):
            import onnxruntime as ort

            so = ort.SessionOptions()  # as optimizer.onnx's session has (no denormal flush: the same bits)
            so.log_severity_level = 3
            try:
                kernels.register(so)
                graph = GraphAdamW(str(self.bundle.path(name)), weight_decay, so)
                self._graphs["optimizer"] = name
                return graph
            except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types here
                kernels.say_once(f"{self.bundle.path(name)} did not load ({str(e).splitlines()[0][:160]}); "
                                 f"the optimizer runs {opt['file']}")
        self._graphs["optimizer"] = opt["file"]
        return GraphAdamW(str(self.bundle.path(opt["file"])), weight_decay)

    def _norms_session(self, name: str) -> Any:
        import onnxruntime as ort

        path = self.bundle.path(name)
        so = session_options(self.threads)
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types here
            raise BundleError(f"{path} (or its weight file) is damaged or not an ONNX model "
                              f"({str(e).splitlines()[0][:160]}); export the bundle again") from None
        self._norms_inputs = [i.name for i in sess.get_inputs()]
        return sess

    @property
    def has_norms_graph(self) -> bool:
        return self._norms_sess is not None

    def dora_norms(self) -> dict[str, np.ndarray]:
        """The ``dora_norm.*`` inputs for the adapter as it is now, from the bundle's norm graph."""
        feed = {n: self.params[n] if n in self.params else self._runtime[n] for n in self._norms_inputs}
        names = [o.name for o in self._norms_sess.get_outputs()]
        return dict(zip(names, self._norms_sess.run(names, feed)))

    # -- sessions ---------------------------------------------------------------------------
    def _open_train(self) -> Any:
        """The fused training graph where it can run (CPU provider, library loads, bundle has it),
        else the plain one; a fused graph the session refuses falls back to the plain one."""
        fused = self.bundle.manifest.get("fused") or {}
        want = kernels.mode()
        why = None
        if want == "plain":
            return self._session("train.onnx")
        if not fused:
            why = f"bundle {self.bundle.root} has no fused graphs (export it again where the kernel library builds)"
        elif self.device.provider != "CPUExecutionProvider":
            why = f"the fused kernels run on the CPU provider, not {self.device.provider}"
        elif fused.get("abi") != kernels.ABI:
            why = f"the bundle's fused graphs need kernel ABI {fused.get('abi')}, this edgetune has {kernels.ABI}"
        elif not kernels.library().ok:
            why = kernels.library().reason
        elif set(missing := kernels.library().lacks(fused.get("ops") or {})) <= kernels.BF16_OPS and missing:
            why = (f"bundle {self.bundle.root}'s fused graphs multiply its bfloat16 weights with AMX or AVX512-BF16, "
                   "which this CPU does not have (or EDGETUNE_ISA turned off); the plain graph multiplies the same "
                   "weights in float32")
        elif kernels.library().lacks(fused.get("ops") or {}):
            why = (f"{kernels.library().path} lacks the kernels {', '.join(kernels.library().lacks(fused['ops']))} "
                   f"that bundle {self.bundle.root}'s fused graphs use (reinstall edgetune)")
        if why is None:
            try:
                sess = self._session(fused["train"], fused=True)
            except DeviceError as e:
                why = str(e)
            else:
                self._graphs = {"train": fused["train"], "eval": fused.get("eval", "eval.onnx")}
                self.kernel_info = f"fused ({kernels.library().isa})"
                return sess
        if want == "fused":
            raise DeviceError(f"EDGETUNE_KERNELS=fused, but {why}")
        kernels.say_once(why)
        return self._session("train.onnx")

    @property
    def fused_attention(self) -> bool:
        """Whether the training graph that runs has the fused attention (memory linear in length)."""
        fused = self.bundle.manifest.get("fused") or {}
        ops = fused.get("ops") or {}
        return self._graphs["train"] == fused.get("train") and bool({"Attention", "AttentionT", "AttentionTBF16"} & set(ops))

    @property
    def graphs(self) -> dict[str, str]:
        """The bundle files the training and eval sessions run."""
        return dict(self._graphs)

    def _session(self, name: str, fused: bool = False, so: Any = None) -> Any:
        """A session of bundle file ``name`` (the kernel library registered for a fused graph), with
        this runner's session options unless ``so`` is given."""
        so = so or session_options(self.threads, self._shared, arena=self.arena, prepack=self._prepack)
        if fused or name.endswith("_fused.onnx"):
            kernels.register(so)
        try:
            sess = devices.session(self.bundle.path(name), self.device, so, training=name.startswith("train"))
            if self._prepack:
                release_pages(self._shared)
            return sess
        except DeviceError as e:
            op = _missing_op(str(e))
            if op and op.startswith(kernels.DOMAIN + ":"):
                raise DeviceError(f"{self.bundle.path(name)} uses {op}, which the kernel library "
                                  f"{kernels.library().path} does not implement; reinstall edgetune or export the "
                                  "bundle again with this edgetune") from None
            if op:
                import onnxruntime as ort

                raise DeviceError(f"{self.bundle.path(name)} uses {op}, which this onnxruntime ({ort.__version__}) "
                                  "cannot run; upgrade it (pip install -U onnxruntime) or export the bundle again "
                                  "with this edgetune") from None
            raise

    @property
    def eval_sess(self) -> Any:
        if self._eval_sess is None:
            self._eval_sess = self._session(self._graphs["eval"])
        return self._eval_sess

    def providers(self) -> list[str]:
        return list(self.train_sess.get_providers())

    # -- parameters -------------------------------------------------------------------------
    def _check_params(self, tensors: Mapping[str, np.ndarray], where: Path) -> None:
        shapes = self.bundle.manifest.get("trainable_shapes", {})
        problems = [f"{n} is missing" for n in self.bundle.trainable if n not in tensors]
        problems += [f"{n} has shape {list(v.shape)}, the bundle expects {shapes[n]}"
                     for n, v in tensors.items() if n in shapes and list(v.shape) != shapes[n]]
        problems += [f"{n} is not a tensor of this bundle" for n in tensors if n not in shapes and shapes]
        if problems:
            raise BundleError(f"{where} does not fit bundle {self.bundle.root}:\n  - " + "\n  - ".join(problems[:8]))

    def set_params(self, tensors: Mapping[str, np.ndarray]) -> None:
        self._check_params(tensors, Path("<adapter>"))
        self.params = {n: np.array(tensors[n], np.float32) for n in self.bundle.trainable}

    def load(self, ck: Path, step_count: int) -> None:
        """Restore parameters and optimizer moments from a checkpoint folder."""
        params = read_tensors(ck / ADAPTER_FILE)
        self._check_params(params, ck / ADAPTER_FILE)
        self.params = {n: params[n] for n in self.bundle.trainable}
        opt = ck / OPTIMIZER_FILE
        if step_count and not opt.is_file():
            raise BundleError(f"{opt} is missing: checkpoint {ck} cannot resume AdamW after step {step_count}; "
                              "resume from an earlier checkpoint (delete this one) or start the run again")
        self.optimizer.load_state(read_tensors(opt) if opt.is_file() else {}, step_count if opt.is_file() else 0)

    def save(self, ck: Path) -> None:
        write_checkpoint(ck, self.params, self.optimizer)

    # -- steps ------------------------------------------------------------------------------
    def _feed(self, batch: Mapping[str, np.ndarray], sess: Any = None) -> dict[str, np.ndarray]:
        feed = {**batch, **self.params}
        if self._runtime:
            names = {i.name for i in (sess or self.train_sess).get_inputs()}
            feed.update({k: v for k, v in self._runtime.items() if k in names})
        return feed

    def accumulate(self, batch: Mapping[str, np.ndarray]) -> float:
        """Forward and backward on one micro-batch; gradients add up until :meth:`step`."""
        out = self.train_sess.run(["loss", *self._grad_names], self._feed(batch), self._run_opts)
        for name, g in zip(self.bundle.trainable, out[1:]):
            if name in self.grads:
                self.grads[name] += g
            else:
                self.grads[name] = g
        return float(np.asarray(out[0]).reshape(()))

    def loss(self, batch: Mapping[str, np.ndarray]) -> float:
        """The loss of one micro-batch with the eval graph (no dropout, no gradients)."""
        return float(np.asarray(self.eval_sess.run(["loss"], self._feed(batch, self.eval_sess), self._run_opts)[0]).reshape(()))

    def step(self, lr: float, schedule: Mapping[str, Any] | None = None) -> None:
        """One AdamW update from the accumulated gradients, which are then cleared. With the bundle's
        optimizer graph, ``schedule`` (its ``base_lr``, ``warmup_steps``, ``total_steps``, ``schedule``
        inputs) lets the graph compute the learning rate, as an app does; else ``lr`` is used."""
        if self.grads:
            if schedule is not None and isinstance(self.optimizer, GraphAdamW):
                self.optimizer.step(self.params, self.grads, lr, schedule)
            else:
                self.optimizer.step(self.params, self.grads, lr)
        self.grads = {}

    def grads_finite(self) -> bool:
        return all(bool(np.isfinite(g).all()) for g in self.grads.values())

    def zero_grad(self) -> None:
        self.grads = {}
