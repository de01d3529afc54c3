"""AdamW on the adapter tensors, in numpy, with ``torch.optim.AdamW``'s update rule.

The adapters are a few MB, so the update costs well under a millisecond per step beside
a forward and backward pass of the whole model; numpy keeps it exact and portable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
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

    def feeds(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float,
              schedule: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The graph's inputs for step ``step_count + 1``: at learning rate ``lr`` (a constant
        schedule), or with ``schedule`` ({base_lr, warmup_steps, total_steps, schedule}) the graph's own."""
        def f32(x: float) -> np.ndarray:
            return np.array(x, np.float32)

        s = dict(schedule) if schedule is not None else {"base_lr": lr, "warmup_steps": 0, "total_steps": 0,
                                                         "schedule": 0}
        feed: dict[str, Any] = {"step": f32(self.step_count + 1), "base_lr": f32(s["base_lr"]),
                                "warmup_steps": f32(s["warmup_steps"]), "total_steps": f32(s["total_steps"]),
                                "schedule": np.array(int(s["schedule"]), np.int64),
                                "weight_decay": f32(self.weight_decay)}
        for name, p in params.items():
            feed[name] = p
            feed[name + "_grad"] = grads[name]
            feed["exp_avg/" + name] = self.exp_avg.get(name, np.zeros_like(p))
            feed["exp_avg_sq/" + name] = self.exp_avg_sq.get(name, np.zeros_like(p))
        missing = [k for k in self._inputs if k not in feed]
        if missing:
            raise ValueError(f"the optimizer graph wants tensors this adapter lacks: {missing[:3]}")
        return {k: v for k, v in feed.items() if k in self._inputs}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray], lr: float,
             schedule: Mapping[str, Any] | None = None) -> None:
        out = dict(zip(self._outputs, self.session.run(self._outputs, self.feeds(params, grads, lr, schedule))))
        self.step_count += 1
        for name in params:
            params[name][...] = out[name + "/updated"]
            self.exp_avg[name] = out["exp_avg/" + name + "/updated"]
            self.exp_avg_sq[name] = out["exp_avg_sq/" + name + "/updated"]
