"""TensorRT's supported ONNX operators, checked in so TensorRT readiness can be proven without TensorRT.

Source: onnx/onnx-tensorrt, ``docs/operators.md`` at commit 6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc
("TensorRT 8.5 supports operators up to Opset 17"): every operator marked ``Y`` in its support matrix.
It is the conservative baseline: later parsers (TensorRT 10.x, 11.x) keep these and add more (e.g.
LayerNormalization, GroupNormalization: ``ADDED_OPS``, with their version and source), so a graph made only of
these ops parses on TensorRT 8.5 and newer, and one that also uses an added op on the version that added it.

Opset range: the parser is backward compatible to opset 9; the newest opset it reads is 17 on TensorRT 8.5,
22 on TensorRT 10.x (onnx-tensorrt README) and 25 on TensorRT 11.x (NVIDIA's "ONNX Opset Guide"). fmkt
exports opset 17 by default, inside every one of those ranges.
"""
from __future__ import annotations

SOURCE = ("onnx/onnx-tensorrt docs/operators.md @ 6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc "
          "(TensorRT 8.5, opset <= 17)")

TRT_OPSET_MIN = 9
TRT_OPSET_MAX = {"8.5": 17, "10": 22, "11": 25}

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul
Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Operators a later parser added, each with the oldest TensorRT that reads it: the same file at commit
# 6872a9473391a73b96741711d52b98c2c3e25146 ("ONNX-TensorRT 8.6-EA release", opset <= 17) marks these Y on top of
# the list above and drops none. LayerNormalization is what the TorchScript exporter writes for
# nn.LayerNorm at opset >= 17 (ViTs, ConvNeXt); ``--opset 16`` decomposes it into ops TensorRT 8.5 reads.
ADDED_OPS = {"8.6": frozenset({"GroupNormalization", "IsInf", "LayerNormalization"})}
ADDED_SOURCE = "onnx/onnx-tensorrt docs/operators.md @ 6872a9473391a73b96741711d52b98c2c3e25146 (TensorRT 8.6)"
BASELINE = "8.5"


def op_since(op: str) -> str | None:
    """The oldest TensorRT (of those listed here) whose ONNX parser supports ``op``; None: none of them."""
    if op in SUPPORTED_OPS:
        return BASELINE
    return next((version for version, ops in ADDED_OPS.items() if op in ops), None)


# The matrix's "must be an initializer / constant" restrictions: op -> input positions.
CONSTANT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,),
                   "TopK": (1,), "CumSum": (1,)}
