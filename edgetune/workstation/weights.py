"""Weights streamed tensor by tensor (workstation side): read from a model's checkpoint files,
written into an ONNX graph's external data file.

Export never loads the model's weights as a whole: graphs are traced from a model whose
weights are placeholders, and each weight is read from the checkpoint, converted (float32, or
block-quantized), written and freed before the next. Graphs of any size are saved with external
data, so protobuf's 2 GB limit never applies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetune.formats.errors import ModelError


class SourceWeights:
    """The tensors of a Hugging Face folder (``*.safetensors``, sharded or not), read one at a time
    as float32. A ``pytorch_model*.bin`` (a pickle) is refused."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            for f in files:
                try:
                    with safe_open(str(f), framework="pt") as h:
                        for k in h.keys():
                            self.where[k] = f
                except Exception as e:  # noqa: BLE001 - any damage: name the file
                    raise ModelError(f"{f}: cannot read the safetensors file ({e}); re-download or re-save the model") from None
        else:
            bins = sorted(self.folder.glob("pytorch_model*.bin"))
            if not bins:
                raise ModelError(f"{self.folder}: no *.safetensors weight files")
            # A .bin checkpoint is a pickle: opening it runs the unpickler on a stranger's bytes.
            raise ModelError(
                f"{bins[0]} is a PyTorch pickle checkpoint, which edgetune does not open (unpickling can run code); "
                "convert it to safetensors where you trust the file, e.g. python -c \"import torch; from "
                "safetensors.torch import save_file; save_file(torch.load('pytorch_model.bin', weights_only=True), "
                "'model.safetensors', metadata={'format': 'pt'})\"")

    def resolve(self, name: str) -> str:
        """The checkpoint key of a model parameter name (some checkpoints omit the ``model.``
        prefix of the base model, or carry a ``model.`` prefix on ``lm_head``)."""
        for key in (name, name.removeprefix("model."), f"model.{name}"):
            if key in self.where:
                return key
        raise ModelError(f"{self.folder}: the checkpoint has no tensor for {name}; is it the model its config.json "
                         "describes?")

    def get(self, name: str) -> np.ndarray:
        key = self.resolve(name)
        f = self.where[key]
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            t = h.get_tensor(key)
        return t.float().numpy() if t.dtype.is_floating_point else t.numpy()
