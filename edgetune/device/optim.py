"""AdamW on the adapter tensors, in numpy, with ``torch.optim.AdamW``'s update rule.

The adapters are a few MB, so the update costs well under a millisecond per step beside
a forward and backward pass of the whole model; numpy keeps it exact and portable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np


@dataclass
class AdamW:
    """PyTorch's AdamW (decoupled weight decay, bias correction), float32 state."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    step_count: int = 0
    exp_avg: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg_sq: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float) -> None:
        """Update ``params`` in place from ``grads``."""
        b1, b2 = self.betas
        self.step_count += 1
        bc1 = 1.0 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.step_count)
        for name, p in params.items():
            g = grads[name]
            m = self.exp_avg.setdefault(name, np.zeros_like(p))
            v = self.exp_avg_sq.setdefault(name, np.zeros_like(p))
            p *= np.float32(1.0 - lr * self.weight_decay)
            m *= np.float32(b1)
            m += np.float32(1.0 - b1) * g
            v *= np.float32(b2)
            v += np.float32(1.0 - b2) * g * g
            denom = np.sqrt(v) / np.float32(bc2_sqrt) + np.float32(self.eps)
            p -= np.float32(lr / bc1) * (m / denom)

    def state(self) -> dict[str, np.ndarray]:
        """Moments keyed ``exp_avg/NAME`` and ``exp_avg_sq/NAME`` (for a safetensors file)."""
        out = {f"exp_avg/{k}": v for k, v in self.exp_avg.items()}
        out.update({f"exp_avg_sq/{k}": v for k, v in self.exp_avg_sq.items()})
        return out

    def load_state(self, tensors: Mapping[str, np.ndarray], step_count: int) -> None:
        self.step_count = int(step_count)
        self.exp_avg = {k.split("/", 1)[1]: np.array(v, np.float32) for k, v in tensors.items() if k.startswith("exp_avg/")}
        self.exp_avg_sq = {k.split("/", 1)[1]: np.array(v, np.float32) for k, v in tensors.items()
                           if k.startswith("exp_avg_sq/")}


class GraphAdamW(AdamW):
    """The same AdamW, run as the bundle's ``optimizer.onnx`` (built by
    ``edgetune.workstation.optimizer_graph``): the graph an app without Python runs for its
    optimizer step, so the Python trainer and an app take identical steps."""

    def __init__(self, path: str, weight_decay: float = 0.01, session_options: Any = None) -> None:
        import onnxruntime as ort

        super().__init__(weight_decay=weight_decay)
        self.session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._binding: Any = None

    def feeds(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float,
              schedule: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The graph's inputs for step ``step_count + 1``: at learning rate ``lr`` (a constant
        schedule), or with ``schedule`` ({base_lr, warmup_steps, total_steps, schedule}) the graph's own."""
        feed: dict[str, Any] = {k: np.array(v, np.int64 if k == "schedule" else np.float32)
                                for k, v in self._scalars(lr, schedule).items()}
        for name, p in params.items():
            feed[name] = p
            feed[name + "_grad"] = grads[name]
            feed["exp_avg/" + name] = self.exp_avg.get(name, np.zeros_like(p))
            feed["exp_avg_sq/" + name] = self.exp_avg_sq.get(name, np.zeros_like(p))
        missing = [k for k in self._inputs if k not in feed]
        if missing:
            raise ValueError(f"the optimizer graph wants tensors this adapter lacks: {missing[:3]}")
        return {k: v for k, v in feed.items() if k in self._inputs}

    def _scalars(self, lr: float, schedule: Mapping[str, Any] | None) -> dict[str, float]:
        """The graph's scalar inputs for step ``step_count + 1`` (``schedule`` an int)."""
        s = dict(schedule) if schedule is not None else {"base_lr": lr, "warmup_steps": 0, "total_steps": 0,
                                                         "schedule": 0}
        return {"step": self.step_count + 1, "base_lr": s["base_lr"], "warmup_steps": s["warmup_steps"],
                "total_steps": s["total_steps"], "schedule": int(s["schedule"]), "weight_decay": self.weight_decay}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float,
             schedule: Mapping[str, Any] | None = None) -> None:
        b = self._bound(params)
        if b is None:  # tensors the bound buffers cannot take: the plain call
            out = dict(zip(self._outputs, self.session.run(self._outputs, self.feeds(params, grads, lr, schedule))))
            self.step_count += 1
            for name in params:
                params[name][...] = out[name + "/updated"]
                self.exp_avg[name] = out["exp_avg/" + name + "/updated"]
                self.exp_avg_sq[name] = out["exp_avg_sq/" + name + "/updated"]
            return
        for key, value in self._scalars(lr, schedule).items():
            if key in b.scalars:
                b.scalars[key][...] = value
        for name, g in b.grads.items():
            np.copyto(g, grads[name], casting="same_kind")
        self.session.run_with_iobinding(b.io[b.parity])
        b.parity ^= 1
        for name, p in b.out.items():
            np.copyto(params[name], p)
        self.exp_avg, self.exp_avg_sq = b.m[b.parity], b.v[b.parity]
        self.step_count += 1

    def _bound(self, params: Mapping[str, np.ndarray]) -> Any:
        """The session's inputs and outputs bound once to buffers of their own (ONNX Runtime's
        IOBinding): each step copies the gradients in and the parameters out, and the moments go back
        and forth between two sets of buffers, instead of converting some 1,700 arrays per call. Bound
        again when the parameters or the moments are other arrays (a new adapter, a loaded
        checkpoint); None where the graph's inputs are not the ones this binds."""
        import onnxruntime as ort

        b = self._binding
        if (b is not None and b.names == list(params) and all(params[n] is b.params[n] for n in params)
                and self.exp_avg is b.m[b.parity] and self.exp_avg_sq is b.v[b.parity]):
            return b
        names = list(params)
        scalars = set(self._scalars(0.0, None))
        want = scalars | {f"{pre}{n}{post}" for n in names
                          for pre, post in (("", ""), ("", "_grad"), ("exp_avg/", ""), ("exp_avg_sq/", ""))}
        outs = {f"{pre}{n}/updated" for n in names for pre in ("", "exp_avg/", "exp_avg_sq/")}
        if not self._inputs <= want or not outs <= set(self._outputs) or \
                any(not p.flags.c_contiguous or p.dtype != np.float32 for p in params.values()):
            self._binding = None
            return None
        b = SimpleNamespace(names=names, params={n: params[n] for n in names}, parity=0)
        b.scalars = {k: np.zeros((), np.int64 if k == "schedule" else np.float32) for k in scalars & self._inputs}
        b.grads = {n: np.zeros_like(params[n]) for n in names}
        b.out = {n: np.zeros_like(params[n]) for n in names}
        def pair(now: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:  # the moments so far, and a second set
            return [{n: np.array(now[n], np.float32) if n in now else np.zeros_like(params[n]) for n in names},
                    {n: np.zeros_like(params[n]) for n in names}]

        b.m, b.v = pair(self.exp_avg), pair(self.exp_avg_sq)
        value = ort.OrtValue.ortvalue_from_numpy  # shares the array's memory on the CPU
        b.keep = []  # the OrtValues, alive as long as the bindings
        b.io = []
        for parity in (0, 1):
            io = self.session.io_binding()
            ins = {**b.scalars, **{n: b.params[n] for n in names}, **{n + "_grad": b.grads[n] for n in names},
                   **{"exp_avg/" + n: b.m[parity][n] for n in names},
                   **{"exp_avg_sq/" + n: b.v[parity][n] for n in names}}
            for k in self._inputs:
                v = value(ins[k])
                b.keep.append(v)
                io.bind_ortvalue_input(k, v)
            dest = {**{n + "/updated": b.out[n] for n in names},
                    **{f"exp_avg/{n}/updated": b.m[1 - parity][n] for n in names},
                    **{f"exp_avg_sq/{n}/updated": b.v[1 - parity][n] for n in names}}
            for k in self._outputs:
                if k in dest:
                    v = value(dest[k])
                    b.keep.append(v)
                    io.bind_ortvalue_output(k, v)
                else:
                    io.bind_output(k, "cpu")
            b.io.append(io)
        self.exp_avg, self.exp_avg_sq = b.m[0], b.v[0]
        self._binding = b
        return b
