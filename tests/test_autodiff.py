"""Every gradient rule of edgetune.workstation.gradients against PyTorch's autograd, on random inputs.

Each case builds a one-op ONNX graph whose inputs are trainable, takes the loss
``sum(op(...) * R)`` for a random R, builds the training graph, runs it in onnxruntime and
compares each input's gradient with torch's. Edge shapes: broadcasting along leading and
inner axes, size-1 dimensions, negative and open-ended slice bounds, repeated gather
indices, ignored labels.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # a workstation test (conftest makes torch and onnx required in CI)
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgetune.formats.errors import ModelError  # noqa: E402
from edgetune.workstation import gradients as autodiff  # noqa: E402
from edgetune.workstation.gradients import prepare

rng = np.random.default_rng(0)


def rand(*shape, positive=False):
    x = rng.standard_normal(shape).astype(np.float32)
    return np.abs(x) + 0.5 if positive else x


def check(op, params, fn, consts=None, attrs=None, domain="", n_out=1, atol=1e-5):
    """Gradient of ``sum(op(params..., consts...) * R)`` by autodiff in ORT vs by torch."""
    import onnxruntime as ort

    consts = consts or {}
    t_in = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    t_c = {k: torch.tensor(v) for k, v in consts.items()}
    y = fn(**t_in, **t_c)
    r = rand(*y.shape)
    (y * torch.tensor(r)).sum().backward()
    names = list(params) + list(consts)
    outs = ["y"] + [f"y{i}" for i in range(1, n_out)]
    nodes = [helper.make_node(op, names, outs, domain=domain, **(attrs or {})),
             helper.make_node("Mul", ["y", "R"], ["yr"]), helper.make_node("ReduceSum", ["yr"], ["loss"], keepdims=0)]
    inits = [numpy_helper.from_array(v, k) for k, v in {**params, **consts, "R": r}.items()]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    tg = autodiff.build(model, list(params), "loss", [{}, {}])
    sess = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(tg.grads, {k: v for k, v in params.items()})
    for (k, t), g in zip(t_in.items(), got):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=atol, err_msg=f"{op} d/d{k}")


BINARY = [((2, 3, 4), (4,)), ((2, 1, 4), (2, 3, 4)), ((3,), (1,)), ((1, 5), (4, 1)), ((2, 3), (2, 3))]


@pytest.mark.parametrize("shapes", BINARY)
@pytest.mark.parametrize("op,fn", [("Add", torch.add), ("Sub", torch.sub), ("Mul", torch.mul),
                                   ("Div", torch.div)])
def test_broadcasting_binary_ops(op, fn, shapes):
    a, b = rand(*shapes[0]), rand(*shapes[1], positive=op == "Div")
    check(op, {"a": a, "b": b}, lambda a, b: fn(a, b))


@pytest.mark.parametrize("op,fn,positive", [
    ("Sqrt", torch.sqrt, True), ("Reciprocal", torch.reciprocal, True), ("Exp", torch.exp, False),
    ("Log", torch.log, True), ("Tanh", torch.tanh, False), ("Sigmoid", torch.sigmoid, False),
    ("Neg", torch.neg, False), ("Identity", lambda x: x, False)])
def test_unary_ops(op, fn, positive):
    check(op, {"x": rand(3, 1, 5, positive=positive)}, lambda x: fn(x))


@pytest.mark.parametrize("p", [2.0, 3.0, 0.5])
def test_pow_with_constant_exponent(p):
    check("Pow", {"x": rand(4, 6, positive=True)}, lambda x, e: torch.pow(x, e), consts={"e": np.float32(p)})


def test_cast_float_to_float():
    check("Cast", {"x": rand(2, 3)}, lambda x: x, attrs={"to": TensorProto.FLOAT})


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_softmax(axis):
    check("Softmax", {"x": rand(2, 3, 7)}, lambda x: torch.softmax(x, axis), attrs={"axis": axis})


@pytest.mark.parametrize("op,fn", [("ReduceMean", torch.mean), ("ReduceSum", torch.sum)])
@pytest.mark.parametrize("axes,keep", [([-1], 1), ([0, 2], 0), ([1], 0)])
def test_reductions(op, fn, axes, keep):
    if op == "ReduceMean":
        check(op, {"x": rand(2, 3, 4)}, lambda x: fn(x, dim=axes, keepdim=bool(keep)), attrs={"axes": axes, "keepdims": keep})
    else:
        check(op, {"x": rand(2, 3, 4)}, lambda x, ax: fn(x, dim=axes, keepdim=bool(keep)),
              consts={"ax": np.array(axes, np.int64)}, attrs={"keepdims": keep})


def test_reshape_squeeze_unsqueeze_flatten():
    check("Reshape", {"x": rand(2, 3, 4)}, lambda x, s: x.reshape(6, 4), consts={"s": np.array([-1, 4], np.int64)})
    check("Unsqueeze", {"x": rand(2, 3)}, lambda x, a: x[:, None, :], consts={"a": np.array([1], np.int64)})
    check("Squeeze", {"x": rand(2, 1, 3)}, lambda x, a: x[:, 0, :], consts={"a": np.array([1], np.int64)})
    check("Flatten", {"x": rand(2, 3, 4)}, lambda x: x.reshape(6, 4), attrs={"axis": 2})


@pytest.mark.parametrize("perm", [[1, 0, 2], [2, 0, 1], [0, 2, 1]])
def test_transpose(perm):
    check("Transpose", {"x": rand(2, 3, 4)}, lambda x: x.permute(*perm), attrs={"perm": perm})


@pytest.mark.parametrize("src,dst", [((2, 1, 4), (2, 3, 4)), ((4,), (3, 2, 4)), ((1, 1), (5, 6))])
def test_expand(src, dst):
    check("Expand", {"x": rand(*src)}, lambda x, s: x.expand(*dst), consts={"s": np.array(dst, np.int64)})


@pytest.mark.parametrize("axis", [0, -1])
def test_concat(axis):
    a, b, c = rand(2, 3), rand(2, 3), rand(2, 3)
    check("Concat", {"a": a, "b": b, "c": c}, lambda a, b, c: torch.cat([a, b, c], axis), attrs={"axis": axis})


@pytest.mark.parametrize("starts,ends,axes", [([0], [2], [2]), ([2], [2**62], [-1]), ([-3], [-1], [1]),
                                              ([1, 0], [3, 1], [0, 2]), ([3], [1], [1]), ([-1], [-4], [2])])
def test_slice(starts, ends, axes):
    x = rand(4, 5, 6)

    def fn(x, s, e, a):
        idx = [slice(None)] * 3
        for st, en, ax in zip(starts, ends, axes):
            idx[ax] = slice(st, None if en >= 2**62 else en)
        return x[tuple(idx)]
    check("Slice", {"x": x}, fn, consts={"s": np.array(starts, np.int64), "e": np.array(ends, np.int64),
                                         "a": np.array(axes, np.int64)})


@pytest.mark.parametrize("which", ["axes", "steps"])
def test_slice_with_computed_axes_or_steps_is_refused_by_name(which):
    x = rand(4, 5)
    consts = {"s": np.array([1], np.int64), "e": np.array([3], np.int64), "a": np.array([1], np.int64),
              "st": np.array([1], np.int64)}
    # axes or steps computed at run time from an input's length (1 in one probe, 2 in the other)
    nodes = [helper.make_node("Shape", ["z"], ["len"]), helper.make_node("Sub", ["len", "one"], ["dyn"]),
             helper.make_node("Slice", ["x", "s", "e", "dyn" if which == "axes" else "a",
                                        "dyn" if which == "steps" else "st"], ["y"], name="the_slice"),
             helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)]
    inits = [numpy_helper.from_array(v, k) for k, v in {"x": x, **consts}.items()]
    inits.append(numpy_helper.from_array(np.array([0 if which == "steps" else 1], np.int64), "one"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"z": np.ones(1, np.float32)}, {"z": np.ones(2, np.float32)}]  # axes 0 or 1; steps 1 or 2
    with pytest.raises(ModelError, match=rf"Slice needs constant {which} \(node the_slice, {which} from dyn\)"):
        autodiff.build(model, ["x"], "loss", feeds)


def test_a_weight_whose_inner_dimension_varies_gets_its_gradient():
    """MatMul(x [2, 3, K], w [K, 5]) with K different in the two probes (w gathered by K indices): the
    one-GEMM path needs a static K, the batched one does not."""
    import onnxruntime as ort

    W = rand(10, 5)
    nodes = [helper.make_node("Gather", ["W", "idx"], ["w"], axis=0), helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, "k"]),
                                           helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rand(2, 3, 4), "idx": np.array([0, 2, 2, 7])}, {"x": rand(2, 3, 6), "idx": np.arange(6)}]
    tg = autodiff.build(model, ["W"], "loss", feeds)
    sess = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds:
        (g,) = sess.run(tg.grads, {**feed, "W": W})
        want = np.zeros_like(W)
        np.add.at(want, feed["idx"], np.repeat(feed["x"].sum((0, 1))[:, None], 5, 1))
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def test_gather_rows_with_repeated_indices():
    idx = np.array([0, 3, 3, 1], np.int64)
    check("Gather", {"x": rand(5, 4)}, lambda x, i: x[i], consts={"i": idx}, attrs={"axis": 0})


def test_where():
    # ONNX puts the condition first; it is a constant, a and b train
    cond = rng.random((3, 4)) > 0.5
    a, b = rand(3, 4), rand(4)
    _where_check(cond, a, b, torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True))


def _where_check(cond, a, b, t_a, t_b):
    import onnxruntime as ort

    y = torch.where(torch.tensor(cond), t_a, t_b)
    r = rand(*y.shape)
    (y * torch.tensor(r)).sum().backward()
    nodes = [helper.make_node("Where", ["c", "a", "b"], ["y"]), helper.make_node("Mul", ["y", "R"], ["yr"]),
             helper.make_node("ReduceSum", ["yr"], ["loss"], keepdims=0)]
    inits = [numpy_helper.from_array(v, k) for k, v in {"c": cond, "a": a, "b": b, "R": r}.items()]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("loss", 1, [])], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    tg = autodiff.build(model, ["a", "b"], "loss", [{}, {}])
    got = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        tg.grads, {"a": a, "b": b})
    np.testing.assert_allclose(got[0], t_a.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(got[1], t_b.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 2, 3, 4), (2, 2, 4, 5)),
                                   ((1, 3, 4), (2, 4, 5)), ((2, 3, 4), (1, 4, 5))])
def test_matmul(sa, sb):
    check("MatMul", {"a": rand(*sa), "b": rand(*sb)}, lambda a, b: a @ b)


@pytest.mark.parametrize("ta,tb,alpha", [(0, 1, 1.0), (1, 0, 0.5), (1, 1, 2.0), (0, 0, -1.5)])
@pytest.mark.parametrize("batched", [False, True])
def test_fused_matmul(ta, tb, alpha, batched):
    lead = (2, 3) if batched else ()
    a = rand(*lead, *((4, 3) if ta else (3, 4)))
    b = rand(*lead, *((5, 4) if tb else (4, 5)))

    def fn(a, b):
        return alpha * (a.transpose(-1, -2) if ta else a) @ (b.transpose(-1, -2) if tb else b)
    check("FusedMatMul", {"a": a, "b": b}, fn, attrs={"transA": ta, "transB": tb, "alpha": alpha},
          domain="com.microsoft")


def test_fused_matmul_weight_on_every_row():
    check("FusedMatMul", {"x": rand(2, 3, 4), "w": rand(5, 4)}, lambda x, w: 0.7 * x @ w.T,
          attrs={"transB": 1, "alpha": 0.7}, domain="com.microsoft")


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("ignore", [None, -100])
def test_softmax_cross_entropy(reduction, ignore):
    labels = np.array([1, 0, 6, 3, 2], np.int64)
    if ignore is not None:
        labels[2] = ignore
    attrs = {"reduction": reduction, **({"ignore_index": ignore} if ignore is not None else {})}

    def fn(s, lab):
        return torch.nn.functional.cross_entropy(s, lab, reduction=reduction,
                                                 ignore_index=-100 if ignore is None else ignore)
    check("SoftmaxCrossEntropyLoss", {"s": rand(5, 7)}, fn, consts={"lab": labels}, attrs=attrs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softmax_cross_entropy_with_every_label_ignored_has_a_zero_gradient(reduction):
    import onnxruntime as ort

    s = rand(4, 7)
    nodes = [helper.make_node("SoftmaxCrossEntropyLoss", ["s", "lab"], ["loss"], reduction=reduction,
                              ignore_index=-100)]
    inits = [numpy_helper.from_array(s, "s"), numpy_helper.from_array(np.full(4, -100, np.int64), "lab")]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    tg = autodiff.build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ["s"], "loss", [{}, {}])
    sess = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (g,) = sess.run(tg.grads, {"s": s})
    np.testing.assert_array_equal(g, np.zeros_like(s))


@pytest.mark.parametrize("dtype,name", [(np.float16, "float16"), (np.float64, "float64")])
def test_a_gradient_through_another_float_type_is_refused_by_name(dtype, name):
    x = rand(3, 4).astype(dtype)
    nodes = [helper.make_node("Mul", ["x", "x"], ["y"]), helper.make_node("Cast", ["y"], ["y32"], to=1),
             helper.make_node("ReduceSum", ["y32"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(x, "x")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match=rf"autodiff: \S+ is {name}; gradients are built in float32 only"):
        autodiff.build(model, ["x"], "loss", [{}, {}])


def test_dropout_gradient_uses_the_forward_mask_and_the_seed_repeats_it():
    """Dropout in training mode: the gradient is R * mask / (1 - ratio) with the very mask the forward
    pass drew (read back from the graph), as torch computes it for a given mask; and a seed repeats it."""
    import onnxruntime as ort

    x, r, ratio = rand(6, 50), rand(6, 50), 0.3
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["y", "m"]), helper.make_node("Mul", ["y", "R"], ["yr"]),
             helper.make_node("ReduceSum", ["yr"], ["loss"], keepdims=0)]
    inits = [numpy_helper.from_array(x, "x"), numpy_helper.from_array(r, "R"),
             numpy_helper.from_array(np.array(ratio, np.float32), "ratio"), numpy_helper.from_array(np.array(True), "train")]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
                                               helper.make_tensor_value_info("m", TensorProto.BOOL, None)], inits)
    tg = autodiff.build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ["x"], "loss", [{}, {}])
    sess = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort.set_seed(7)
    g, mask = sess.run([tg.grads[0], "m"], {"x": x})
    assert 0 < mask.sum() < mask.size  # some kept, some dropped
    tx = torch.tensor(x, requires_grad=True)
    y = tx * torch.tensor(mask, dtype=torch.float32) / (1 - ratio)
    (y * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(g, tx.grad.numpy(), rtol=1e-6, atol=1e-7)
    ort.set_seed(7)
    g2, mask2 = sess.run([tg.grads[0], "m"], {"x": x})
    assert np.array_equal(mask, mask2) and np.array_equal(g, g2)


def test_dropout_with_ratio_zero_is_identity():
    check("Dropout", {"x": rand(3, 4)}, lambda x, r, t: x,
          consts={"r": np.array(0.0, np.float32), "t": np.array(True)})


def test_fusion_folds_transpose_and_scale():
    """MatMul(X, Transpose(W)) * c becomes one FusedMatMul(transB=1, alpha=c)."""
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["m"]),
             helper.make_node("Mul", ["m", "c"], ["y"])]
    inits = [numpy_helper.from_array(rand(5, 4), "w"), numpy_helper.from_array(np.float32(0.25), "c")]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [3, 4])],
                                                [helper.make_tensor_value_info("y", 1, [3, 5])], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    prepare.fuse_matmuls(model)
    (node,) = model.graph.node
    assert node.op_type == "FusedMatMul" and list(node.input) == ["x", "w"] and node.output[0] == "y"
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
        "transA": 0, "transB": 1, "alpha": 0.25}


def test_an_op_without_a_rule_is_named():
    nodes = [helper.make_node("Erf", ["x"], ["y"]), helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("loss", 1, [])],
                                                [numpy_helper.from_array(rand(3), "x")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="no gradient rule for Erf"):
        autodiff.build(model, ["x"], "loss", [{}, {}])


@pytest.mark.parametrize("alpha", [1.0, 1.702])
def test_quick_gelu(alpha):
    check("QuickGelu", {"x": rand(3, 8) * 3}, lambda x: x * torch.sigmoid(alpha * x), attrs={"alpha": alpha},
          domain="com.microsoft")


def test_silu_becomes_one_quick_gelu():
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [3])],
                                                [helper.make_tensor_value_info("y", 1, [3])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    prepare.fuse_matmuls(model)
    (node,) = model.graph.node
    assert node.op_type == "QuickGelu" and helper.get_attribute_value(node.attribute[0]) == 1.0


def _layer_graph(nodes, params, consts, out="loss"):
    inits = [numpy_helper.from_array(v, k) for k, v in {**params, **consts}.items()]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _backward_reads(tg, name):
    nodes = list(tg.model.graph.node)
    fwd_end = next(k for k, n in enumerate(nodes) if n.name.startswith("grad/") and n.op_type != "Shape")
    return [n.name for n in nodes[fwd_end:] if name in n.input and n.op_type != "Shape"]


def test_noop_cast_is_dropped_and_its_reader_takes_the_input():
    import onnxruntime as ort

    x, r = rand(3, 4), rand(3, 4)
    nodes = [helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["xc", "xc"], ["y"]), helper.make_node("Mul", ["y", "R"], ["yr"]),
             helper.make_node("ReduceSum", ["yr"], ["loss"], keepdims=0)]
    tg = autodiff.build(_layer_graph(nodes, {"x": x}, {"R": r}), ["x"], "loss", [{}, {}])
    assert not any(n.op_type == "Cast" and n.name == "cast" for n in tg.model.graph.node)
    got = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(tg.grads, {"x": x})
    np.testing.assert_allclose(got[0], 2 * x * r, rtol=1e-6)


def test_rms_norm_outputs_are_recomputed_not_saved():
    """The backward pass reads neither x / rms(x) nor its scaled copy (the adapters' input) from
    the forward pass: it divides again, from x and rms(x), which it keeps anyway."""
    import onnxruntime as ort

    x0, r0, a, r = rand(2, 5, 4), rand(2, 5, 4), rand(4, 3), rand(2, 5, 3)
    w, eps = rand(4), np.array(1e-5, np.float32)
    L = "/model/layers.0/norm/"
    nodes = [helper.make_node("Mul", ["x0", "R0"], ["x"], name="embed"),
             helper.make_node("Pow", ["x", "two"], ["sq"], name=L + "pow"),
             helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1, name=L + "mean"),
             helper.make_node("Add", ["ms", "eps"], ["mse"], name=L + "add"),
             helper.make_node("Sqrt", ["mse"], ["rms"], name=L + "sqrt"),
             helper.make_node("Div", ["x", "rms"], ["xhat"], name=L + "div"),
             helper.make_node("Mul", ["xhat", "w"], ["normed"], name=L + "scale"),
             helper.make_node("MatMul", ["normed", "A"], ["y"], name="/model/layers.0/lora_A"),
             helper.make_node("Mul", ["y", "R"], ["yr"], name="head"),
             helper.make_node("ReduceSum", ["yr"], ["loss"], keepdims=0, name="sum")]
    consts = {"R0": r0, "R": r, "w": w, "eps": eps, "two": np.array(2.0, np.float32)}
    tg = autodiff.build(_layer_graph(nodes, {"x0": x0, "A": a}, consts), ["x0", "A"], "loss", [{}, {}])
    assert _backward_reads(tg, "xhat") == [] and _backward_reads(tg, "normed") == []
    got = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        tg.grads, {"x0": x0, "A": a})
    tx, ta = torch.tensor(x0, requires_grad=True), torch.tensor(a, requires_grad=True)
    x = tx * torch.tensor(r0)
    normed = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * torch.tensor(w)
    ((normed @ ta) * torch.tensor(r)).sum().backward()
    for g, t in zip(got, (tx, ta)):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_attention_probabilities_and_silu_are_recomputed_not_saved():
    """Selective recomputation: the backward pass reads neither the softmax's nor the SiLU's
    output from the forward pass, and the gradients are unchanged."""
    import onnxruntime as ort

    q, k, v, r = rand(2, 5, 4), rand(2, 6, 4), rand(2, 6, 4), rand(2, 5, 4)
    L = "/model/layers.0/"
    nodes = [helper.make_node("FusedMatMul", ["q", "k"], ["s"], domain="com.microsoft", transB=1, alpha=0.5,
                              name=L + "qk"),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1, name=L + "softmax"),
             helper.make_node("MatMul", ["p", "v"], ["o"], name=L + "pv"),
             helper.make_node("QuickGelu", ["o"], ["act"], domain="com.microsoft", alpha=1.0, name=L + "act"),
             helper.make_node("Mul", ["act", "o"], ["h"], name=L + "gate"),
             helper.make_node("Mul", ["h", "R"], ["hr"], name="head"),
             helper.make_node("ReduceSum", ["hr"], ["loss"], keepdims=0, name="sum")]
    tg = autodiff.build(_layer_graph(nodes, {"q": q, "k": k, "v": v}, {"R": r}), ["q", "k", "v"], "loss", [{}, {}])
    assert _backward_reads(tg, "p") == [] and _backward_reads(tg, "act") == []
    got = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        tg.grads, {"q": q, "k": k, "v": v})
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    o = torch.softmax(0.5 * tq @ tk.transpose(-1, -2), -1) @ tv
    ((torch.nn.functional.silu(o) * o) * torch.tensor(r)).sum().backward()
    for g, t in zip(got, (tq, tk, tv)):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=1e-5)


# -- rules on dynamic shapes: every rule that broadcasts or reduces, probed at two shapes ---------

def check_dynamic(op, w, fn, d_shapes, d_dims, attrs=None, consts=None, order=("d", "w"), domain=""):
    """Gradient of ``sum(op(d, w)^2) / 2`` with respect to the parameter ``w``, where ``d`` is a graph
    input with symbolic dimensions fed at two different shapes, against torch at each shape."""
    import onnxruntime as ort

    consts = consts or {}
    ins = [{"d": "d", "w": "w"}.get(k, k) for k in order]
    nodes = [helper.make_node(op, ins, ["y"], domain=domain, **(attrs or {})), helper.make_node("Mul", ["y", "y"], ["y2"]),
             helper.make_node("ReduceSum", ["y2"], ["s"], keepdims=0), helper.make_node("Mul", ["s", "half"], ["loss"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    inits += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("d", TensorProto.FLOAT, d_dims)],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    feeds = [{"d": rand(*shape)} for shape in d_shapes]
    tg = autodiff.build(helper.make_model(graph, opset_imports=opsets), ["w"], "loss", feeds)
    sess = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds:
        (g,) = sess.run(tg.grads, {**feed, "w": w})
        tw = torch.tensor(w, requires_grad=True)
        y = fn(torch.tensor(feed["d"]), tw, **{k: torch.tensor(v) for k, v in consts.items()})
        ((y * y).sum() / 2).backward()
        np.testing.assert_allclose(g, tw.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{op} at {feed['d'].shape}")


DYN = [(2, 3, 4), (3, 5, 4)]  # two probes: batch and length differ


@pytest.mark.parametrize("op,fn", [("Add", torch.add), ("Sub", torch.sub), ("Mul", torch.mul), ("Div", torch.div)])
@pytest.mark.parametrize("wshape", [(4,), (1, 1, 4), (1, 4)])
def test_broadcasting_binary_ops_on_dynamic_shapes(op, fn, wshape):
    w = rand(*wshape, positive=True)
    check_dynamic(op, w, lambda d, w: fn(d, w), DYN, ["b", "t", 4])
    check_dynamic(op, w, lambda d, w: fn(w, d), DYN, ["b", "t", 4], order=("w", "d"))


@pytest.mark.parametrize("op,fn", [("ReduceMean", torch.mean), ("ReduceSum", torch.sum)])
@pytest.mark.parametrize("axes", [[1], [0, 1], [-1]])
def test_reductions_over_dynamic_axes(op, fn, axes):
    w = rand(4)
    # y = reduce(d * w): the count of a mean over a dynamic axis differs between the probes
    def torch_fn(d, w):
        return fn(d * w, dim=tuple(axes), keepdim=True)
    check_dynamic_reduce(op, w, torch_fn, axes)


def check_dynamic_reduce(op, w, fn, axes):
    import onnxruntime as ort

    nodes = [helper.make_node("Mul", ["d", "w"], ["dw"]), helper.make_node(op, ["dw", "ax"], ["y"], keepdims=1),
             helper.make_node("Mul", ["y", "y"], ["y2"]), helper.make_node("ReduceSum", ["y2"], ["loss"], keepdims=0)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(axes, np.int64), "ax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["b", "t", 4])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    opset = 18  # axes as an input for both reductions
    feeds = [{"d": rand(*shape)} for shape in DYN]
    tg = autodiff.build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), ["w"], "loss", feeds)
    sess = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds:
        (g,) = sess.run(tg.grads, {**feed, "w": w})
        tw = torch.tensor(w, requires_grad=True)
        (fn(torch.tensor(feed["d"]), tw) ** 2).sum().backward()
        np.testing.assert_allclose(g, tw.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{op} {axes} at {feed['d'].shape}")


def test_concat_with_a_dynamic_part():
    """The split of the gradient between the parts differs between the probes (t = 3, then 5)."""
    w = rand(1, 2, 4)
    check_dynamic("Concat", w, lambda d, w: torch.cat([d, w], 1), [(1, 3, 4), (1, 5, 4)], [1, "t", 4],
                  attrs={"axis": 1})


def test_where_and_expand_on_dynamic_shapes():
    w = rand(1, 4)
    cond = np.array([True, False, True, True])
    check_dynamic("Where", w, lambda d, w, c: torch.where(c, d, w), DYN, ["b", "t", 4], consts={"c": cond},
                  order=("c", "d", "w"))
    w2 = rand(4)

    def expand(d, w):
        return w.expand(d.shape) * d
    import onnxruntime as ort

    nodes = [helper.make_node("Shape", ["d"], ["sh"]), helper.make_node("Expand", ["w", "sh"], ["e"]),
             helper.make_node("Mul", ["e", "d"], ["y"]), helper.make_node("Mul", ["y", "y"], ["y2"]),
             helper.make_node("ReduceSum", ["y2"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["b", "t", 4])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], [numpy_helper.from_array(w2, "w")])
    feeds = [{"d": rand(*shape)} for shape in DYN]
    tg = autodiff.build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ["w"], "loss", feeds)
    sess = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds:
        (g,) = sess.run(tg.grads, {**feed, "w": w2})
        tw = torch.tensor(w2, requires_grad=True)
        (expand(torch.tensor(feed["d"]), tw) ** 2).sum().backward()
        np.testing.assert_allclose(g, tw.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_matmul_weight_against_dynamic_batches():
    w = rand(4, 3)
    check_dynamic("MatMul", w, lambda d, w: d @ w, DYN, ["b", "t", 4])


def test_build_leaves_its_input_alone_and_writes_nothing(tmp_path):
    """The graph given to build is not edited (the prepared forward graph comes back as ``forward``),
    and probing a graph with external weights writes no file beside them."""
    x, r = rand(3, 4), rand(3, 4)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"]),
             helper.make_node("Mul", ["y", "R"], ["yr"]), helper.make_node("ReduceSum", ["yr"], ["loss"], keepdims=0)]
    inits = [numpy_helper.from_array(v, k) for k, v in {"x": x, "R": r, "w": rand(4, 4)}.items()]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    given = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    before, files = given.SerializeToString(), sorted(p.name for p in tmp_path.iterdir())
    tg = autodiff.build(given, ["w"], "loss", [{}, {}], base_dir=tmp_path)
    assert given.SerializeToString() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    assert [n.op_type for n in tg.forward.graph.node] == ["FusedMatMul", "Mul", "ReduceSum"]  # prepared
    assert "w" in [i.name for i in tg.forward.graph.input]


def test_static_reshape_targets():
    s = prepare.static_reshape
    assert s([(2, 7, 576), (3, 5, 576)], [(2, 7, 9, 64), (3, 5, 9, 64)]) == [0, 0, 9, 64]
    assert s([(2, 7, 576), (3, 5, 576)], [(14, 576), (15, 576)]) == [-1, 576]
    assert s([(2, 7, 9, 64), (3, 5, 9, 64)], [(2, 7, 576), (3, 5, 576)]) == [0, 0, 576]
    # two dimensions that follow neither themselves nor the input's: left to the graph
    assert s([(14, 576), (15, 576)], [(2, 7, 576), (3, 5, 576)]) is None
    # one probe cannot tell a fixed dimension from a batch size; an empty one would read as "copy"
    assert s([(2, 7, 576)], [(2, 7, 9, 64)]) is None
    assert s([(2, 0, 576), (3, 0, 576)], [(2, 0, 9, 64), (3, 0, 9, 64)]) is None


def test_reshapes_to_computed_shapes_read_constants_and_train_on_unprobed_shapes():
    """The exporter's pattern: heads split with a target computed from Shape, Gather, Unsqueeze and
    Concat, merged back the same way. Every reshape, forward and backward, reads a constant, the
    shape nodes that computed the targets are gone, and the gradient is right on a shape neither
    probe had."""
    import onnxruntime as ort

    w = rand(6, 6)

    def dims(src, tag, tail):
        nodes = [helper.make_node("Shape", [src], [f"{tag}s"])]
        parts = []
        for i in (0, 1):
            nodes += [helper.make_node("Gather", [f"{tag}s", f"i{i}"], [f"{tag}g{i}"], axis=0),
                      helper.make_node("Unsqueeze", [f"{tag}g{i}", "ax0"], [f"{tag}u{i}"])]
            parts.append(f"{tag}u{i}")
        return nodes + [helper.make_node("Concat", parts + [tail], [f"{tag}shape"], axis=0)]

    nodes = [helper.make_node("MatMul", ["d", "w"], ["y"]), *dims("d", "a", "heads"),
             helper.make_node("Reshape", ["y", "ashape"], ["yh"]),
             helper.make_node("Transpose", ["yh"], ["yt"], perm=[0, 2, 1, 3]),
             helper.make_node("Mul", ["yt", "yt"], ["sq"]),
             helper.make_node("Transpose", ["sq"], ["st"], perm=[0, 2, 1, 3]), *dims("d", "b", "width"),
             helper.make_node("Reshape", ["st", "bshape"], ["z"]),
             helper.make_node("ReduceSum", ["z"], ["loss"], keepdims=0)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0, np.int64), "i0"),
             numpy_helper.from_array(np.array(1, np.int64), "i1"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "heads"),
             numpy_helper.from_array(np.array([6], np.int64), "width")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["b", "t", 6])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tg = autodiff.build(model, ["w"], "loss", [{"d": rand(2, 3, 6)}, {"d": rand(3, 5, 6)}])
    g = tg.model.graph
    consts = {i.name: numpy_helper.to_array(i).tolist() for i in g.initializer}
    targets = sorted(consts.get(n.input[1]) for n in g.node if n.op_type == "Reshape")
    assert [0, 0, 2, 3] in targets and [0, 0, 6] in targets and None not in targets
    shape_ops = ("Shape", "Gather", "Unsqueeze", "Concat")
    assert not [n.op_type for n in tg.forward.graph.node if n.op_type in shape_ops]
    assert not [n.op_type for n in g.node if n.op_type in ("Gather", "Concat")]  # (the sum's gradient reads a Shape)
    sess = ort.InferenceSession(tg.model.SerializeToString(), providers=["CPUExecutionProvider"])
    d = rand(4, 7, 6)
    (got,) = sess.run(tg.grads, {"d": d, "w": w})
    tw = torch.tensor(w, requires_grad=True)
    (torch.tensor(d) @ tw).pow(2).sum().backward()
    np.testing.assert_allclose(got, tw.grad.numpy(), rtol=1e-4, atol=1e-4)
