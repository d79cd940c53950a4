"""What TensorRT's ONNX parser accepts: the operator table the TensorRT-readiness lint checks against.

Transcribed from onnx/onnx-tensorrt `docs/operators.md` as released with TensorRT 10.15 GA
("TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"). walkforge
builds need TensorRT >= 10.9 (AOT Python plugins); ops added after 10.9 are marked in `SINCE`
so a finding can say when an older TensorRT will refuse them. Update the table, `TABLE_VERSION`
and `OPSET_RANGE` together when re-reading a newer operators.md.
"""

from __future__ import annotations

TABLE_VERSION = "10.15"
"""TensorRT release whose operators.md the tables below reflect."""
TABLE_SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15 GA)"
OPSET_RANGE = (9, 24)
"""Standard ONNX opsets TensorRT 10.15's parser accepts, inclusive."""
MIN_TRT = "10.9"
"""Oldest TensorRT walkforge builds for: `tensorrt.plugin.aot_impl` appeared in 10.9."""


def _names(block: str) -> frozenset[str]:
    """Op names from a whitespace-separated block (keeps the table below as readable as the source)."""
    return frozenset(block.split())


SUPPORTED: frozenset[str] = _names("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where Xor
""")
"""Ops marked "Y" in the support matrix."""

UNSUPPORTED: frozenset[str] = _names("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad
Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder
MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss
Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch
SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit
TfIdfVectorizer Unique
""")
"""Ops marked "N" in the support matrix (the parser refuses them)."""

SINCE: dict[str, str] = {
    "Attention": "10.14",
    "RMSNormalization": "10.15",
    "RotaryEmbedding": "10.15",
    "TensorScatter": "10.15",
}
"""Ops in the table that TensorRT releases before the given one (but >= MIN_TRT) lack."""

RESTRICTIONS: dict[str, str] = {
    "DequantizeLinear": "`x_zero_point` must be zero; input types INT8, FP8, FP4, INT4",
    "QuantizeLinear": "`y_zero_point` must be 0",
    "ScatterND": "`reduction` other than `none` is not supported",
    "TopK": "`sorted` must be 1; K < 3840",
    "LayerNormalization": "only the first output `Y` is supported",
    "MaxPool": "2D or 3D only; the `Indices` output is unsupported; `dilations` all ones",
    "AveragePool": "2D or 3D only; `dilations` empty or all ones",
    "Resize": "modes nearest/linear; antialiasing unsupported; `stretch` aspect ratio policy only",
    "Constant": "`sparse_value`, `value_string` and `value_strings` are unsupported",
    "Dropout": "`is_training` must be an initializer that evaluates to False",
    "CumSum": "`axis` must be a build-time constant",
    "Loop": "scan output length cannot be dynamic; carried shapes fixed across iterations",
    "If": "both branches' outputs must have the same rank and different names",
    "Attention": "4-D Q/K/V/mask only; no past_key/past_value inputs or present_* outputs",
    "TensorScatter": "`past_cache` and `update` 4-D, `axis` = -2",
    "Where": "FP32, FP16, BF16, INT32, INT64 and BOOL values all supported (bool Where is an "
             "onnxruntime-CPU gap, not a TensorRT one)",
}  # fmt: skip
"""Restrictions from the table's last column for ops walkforge graphs use or could produce.

The lint checks the statically checkable ones (see graphs.trt_lint); the rest are documentation.
"""

RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_COORDINATE_MODES = frozenset(
    {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
)

QDQ_FUSING_CONSUMERS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
"""Ops TensorRT fuses a preceding DequantizeLinear into (explicit quantization)."""

PLUGIN_ATTRIBUTE_TYPES = frozenset({"INT", "FLOAT", "STRING", "INTS", "FLOATS"})
"""ONNX attribute types walkforge plugin nodes may carry.

The parser turns INT/FLOAT/STRING/INTS/FLOATS/STRINGS and some TENSORs into plugin fields and
refuses GRAPH, SPARSE_TENSOR, TYPE_PROTO and the list forms of those; `tensorrt.plugin.register`
can declare scalars and 1-D numeric arrays only, so STRINGS and TENSOR are refused here too.
INT attributes reach the plugin as int32.
"""
