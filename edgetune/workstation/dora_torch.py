"""DoRA on the export side (torch): the PEFT modules, their norms turned into graph inputs while
tracing, and their initial values. The numpy side the device uses is :mod:`edgetune.device.dora`."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from edgetune.device.dora import row_norms


def torch_modules(peft_model: Any) -> list[tuple[str, Any]]:
    """(graph path, PEFT LoraLayer) for every DoRA layer, graph paths as after strip_prefix."""
    out = []
    for name, mod in peft_model.named_modules():
        mags = getattr(mod, "lora_magnitude_vector", None)
        if mags is not None and "default" in mags:
            out.append((name, mod))
    return out


@contextlib.contextmanager
def norms_from_inputs(peft_model: Any) -> Iterator[list[tuple[str, Any]]]:
    """While tracing, every DoRA layer takes its weight norm from ``layer._edgetune_norm``,
    which the wrapper's forward sets from a graph input, instead of computing it."""
    mods = torch_modules(peft_model)
    patched = []
    for _name, mod in mods:
        dl = mod.lora_magnitude_vector["default"]
        orig_norm, orig_lw = dl.get_weight_norm, dl.get_lora_weight

        def get_weight_norm(weight, lora_weight, scaling, adapter_name=None, _dl=dl):  # noqa: ANN001
            return _dl._edgetune_norm

        def get_lora_weight(lora_A, lora_B, adapter_name=None):  # noqa: ANN001, N803
            return lora_A.weight.new_zeros(())  # only fed to the norm, which is an input now

        dl.get_weight_norm, dl.get_lora_weight = get_weight_norm, get_lora_weight
        patched.append((dl, orig_norm, orig_lw))
    try:
        yield mods
    finally:
        for dl, orig_norm, orig_lw in patched:
            dl.get_weight_norm, dl.get_lora_weight = orig_norm, orig_lw
            if hasattr(dl, "_edgetune_norm"):
                del dl._edgetune_norm


def set_norms(mods: list[tuple[str, Any]], norms: tuple[Any, ...]) -> None:
    for (_name, mod), n in zip(mods, norms):
        mod.lora_magnitude_vector["default"]._edgetune_norm = n


def initial_norms(mods: list[tuple[str, Any]]) -> list[Any]:
    """The norms of the weights as they are now (B = 0 at init: the base rows' norms)."""
    import torch

    out = []
    with torch.no_grad():
        for _name, mod in mods:
            w = mod.base_layer.weight.detach().float().numpy()
            a = mod.lora_A["default"].weight.detach().float().numpy()
            b = mod.lora_B["default"].weight.detach().float().numpy()
            out.append(torch.from_numpy(row_norms(w, a, b, float(mod.scaling["default"]))))
    return out
