"""export --gradient-checkpointing: the backward pass recomputes each layer instead of reading
activations saved by the forward pass. The same losses and adapters as without it, and no
backward node reads a layer-internal forward tensor (what it saves is measured on a 3.8B model
by bench/scale.py)."""
import json
import re

import numpy as np
import pytest

from edgetune.device import trainer
from edgetune.formats.config import AdapterConfig

pytest.importorskip("torch")
TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module", params=[None, "int4"], ids=["float", "int4"])
def bundles(request, tiny_model, tmp_path_factory):
    from edgetune.workstation.export import export

    out = tmp_path_factory.mktemp("gc")
    made = {}
    for gc in (False, True):
        cfg = AdapterConfig(rank=4, alpha=8, targets=TARGETS, quantize=request.param, gradient_checkpointing=gc)
        made[gc] = export(str(tiny_model), out / f"b-{gc}", cfg)
    return made


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_same_training(bundles, chat_data, tmp_path):
    """The same optimization: ONNX Runtime fuses the two graphs' nodes differently, so float
    results may differ in the last bits, no more."""
    from safetensors.numpy import load_file

    runs = {gc: trainer.train(b, chat_data, tmp_path / f"r-{gc}", steps=6, lr=1e-2, batch_size=4,
                              progress=False, log=lambda s: None) for gc, b in bundles.items()}
    np.testing.assert_allclose(_losses(runs[True].out), _losses(runs[False].out), rtol=0, atol=3e-6)
    a = load_file(str(runs[True].out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs[False].out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # relative to the tensor's norm: AdamW turns last-bit gradient noise on an element whose
        # gradient is near zero into an lr-sized step (as in test_architectures)
        assert np.linalg.norm(a[k] - b[k]) <= 1e-4 * np.linalg.norm(b[k]), k


def test_backward_reads_only_layer_inputs(bundles):
    import onnx

    layer = re.compile(r"layers\.(\d+)[/.]")
    for gc, bundle in bundles.items():
        g = onnx.load(str(bundle / "train.onnx"), load_external_data=False).graph
        fwd_end = next(k for k, n in enumerate(g.node) if n.name.startswith("grad/"))
        producer = {o: n for n in g.node[:fwd_end] for o in n.output}
        crossing = {i for n in g.node[:fwd_end] for i in n.input
                    if i in producer and layer.search(producer[i].name)
                    and layer.search(producer[i].name).group(1) != (layer.search(n.name) or [None, None])[1]}
        # Shape reads of forward tensors sit at the end of the forward pass and run as soon as they can.
        internal = {i for n in g.node[fwd_end:] if n.op_type != "Shape" for i in n.input
                    if i in producer and layer.search(producer[i].name) and i not in crossing
                    and producer[i].op_type != "Constant"}
        if gc:
            assert not internal, sorted(internal)[:5]
        else:
            assert len(internal) > 20  # what the checkpointed graph no longer keeps
