"""ONNX models written node by node with onnx.helper (no exporter involved), for the ONNX-import tests and
``bench/onnx_import.py``: an opset-11 network with the ops of that opset's own forms (Split's sizes and
ReduceMean's axes as attributes, Resize with roi and scales inputs), and small broken or degenerate graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(rng, name: str, shape, scale: float = 0.2) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _conv(nodes, inits, rng, name: str, x: str, c_in: int, c_out: int, k: int = 3, stride: int = 1,
          bn: bool = True, act: str | None = "Relu") -> str:
    inits += [_init(rng, f"{name}.w", (c_out, c_in, k, k)), _init(rng, f"{name}.b", (c_out,), 0.05)]
    nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.conv"], name=f"{name}/Conv",
                                  kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride]))
    out = f"{name}.conv"
    if bn:
        inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, c_out).astype(np.float32), f"{name}.bn.scale"),
                  _init(rng, f"{name}.bn.bias", (c_out,), 0.1), _init(rng, f"{name}.bn.mean", (c_out,), 0.1),
                  numpy_helper.from_array(rng.uniform(0.5, 1.5, c_out).astype(np.float32), f"{name}.bn.var")]
        nodes.append(helper.make_node("BatchNormalization", [out, f"{name}.bn.scale", f"{name}.bn.bias",
                                                             f"{name}.bn.mean", f"{name}.bn.var"],
                                      [f"{name}.bn"], name=f"{name}/BatchNormalization"))
        out = f"{name}.bn"
    if act:
        nodes.append(helper.make_node(act, [out], [f"{name}.act"], name=f"{name}/{act}"))
        out = f"{name}.act"
    return out


def opset11_net(size: int = 32, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Stem, a residual pair, a split / conv / concat block (Split with a ``split`` attribute), a nearest Resize
    (roi and scales inputs) and a strided conv, then two outputs: class logits through Reshape, ReduceMean
    (``axes`` attribute) and Gemm, and a 4-channel box map through a Sigmoid."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = _conv(nodes, inits, rng, "stem", "images", 3, 16)
    y = _conv(nodes, inits, rng, "res", x, 16, 16)
    nodes.append(helper.make_node("Add", [x, y], ["res.add"], name="res/Add"))
    nodes.append(helper.make_node("Split", ["res.add"], ["split.a", "split.b"], name="block/Split", axis=1,
                                  split=[8, 8]))
    b = _conv(nodes, inits, rng, "block.cv", "split.b", 8, 8)
    nodes.append(helper.make_node("Concat", ["split.a", "split.b", b], ["block.cat"], name="block/Concat", axis=1))
    c = _conv(nodes, inits, rng, "block.out", "block.cat", 24, 16, k=1)
    inits += [numpy_helper.from_array(np.zeros(0, np.float32), "resize.roi"),
              numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "resize.scales")]
    nodes.append(helper.make_node("Resize", [c, "resize.roi", "resize.scales"], ["up"], name="up/Resize",
                                  mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
    d = _conv(nodes, inits, rng, "down", "up", 16, 32, stride=2)
    inits.append(numpy_helper.from_array(np.array([1, 32, -1], np.int64), "flat.shape"))
    nodes.append(helper.make_node("Reshape", [d, "flat.shape"], ["flat"], name="head/Reshape"))
    nodes.append(helper.make_node("ReduceMean", ["flat"], ["pooled"], name="head/ReduceMean", axes=[2], keepdims=0))
    inits += [_init(rng, "fc.w", (classes, 32)), _init(rng, "fc.b", (classes,), 0.05)]
    nodes.append(helper.make_node("Gemm", ["pooled", "fc.w", "fc.b"], ["logits"], name="head/Gemm", transB=1))
    box = _conv(nodes, inits, rng, "box", d, 32, 4, k=1, bn=False, act="Sigmoid")
    graph = helper.make_graph(
        nodes, "opset11_net", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes]),
         helper.make_tensor_value_info(box, TensorProto.FLOAT, [1, 4, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    onnx.checker.check_model(model)
    return model


def unconvertible_net(seed: int = 0) -> onnx.ModelProto:
    """A conv, then SpaceToDepth (no converter in onnx2torch), then a conv: the op sits in the body."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = _conv(nodes, inits, rng, "stem", "images", 3, 8)
    nodes.append(helper.make_node("SpaceToDepth", [x], ["s2d"], name="stem/SpaceToDepth", blocksize=2))
    y = _conv(nodes, inits, rng, "next", "s2d", 32, 8)
    graph = helper.make_graph(nodes, "unconvertible", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                      [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def nothing_prunable_net(seed: int = 0) -> onnx.ModelProto:
    """Conv → softmax over the channels → conv: the only hidden channels meet a softmax over their own axis,
    so they are kept whole, and the output conv's channels are the output's."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = _conv(nodes, inits, rng, "stem", "images", 3, 16, bn=False, act=None)
    nodes.append(helper.make_node("Softmax", [x], ["probs"], name="stem/Softmax", axis=1))
    y = _conv(nodes, inits, rng, "out", "probs", 16, 4, k=1, bn=False, act=None)
    graph = helper.make_graph(nodes, "nothing_prunable", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                         [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
