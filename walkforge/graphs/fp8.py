"""Old home of the Q/DQ pass, kept so existing imports work: the pass does FP8 and INT8, and lives
in `walkforge.graphs.qdq`. New code imports from there."""

from walkforge.graphs.qdq import (
    FP8,
    FP8_MAX,
    GEMM_OPS,
    INT8_MAX,
    INT8_WEIGHT_BITS,
    MIN_OPSET,
    NORM_OPS,
    ORT_DISABLED_OPTIMIZERS,
    QDTYPES,
    SEVEN_BIT_MIN_COSINE,
    Exclude,
    QDType,
    WeightUse,
    count_norms,
    fp8_scales,
    int8_weight_max,
    module_path,
    node_name,
    plan_qdq,
    qdq_scales,
    quantize_fp8,
    quantize_int8,
    quantize_qdq,
    read_tensor,
    weight_uses,
)

plan_fp8 = plan_qdq  # its old name: it plans Q/DQ for either dtype

__all__ = [
    "FP8", "FP8_MAX", "GEMM_OPS", "INT8_MAX", "INT8_WEIGHT_BITS", "MIN_OPSET", "NORM_OPS",
    "ORT_DISABLED_OPTIMIZERS", "QDTYPES", "SEVEN_BIT_MIN_COSINE", "Exclude", "QDType", "WeightUse",
    "count_norms", "fp8_scales", "int8_weight_max", "module_path", "node_name", "plan_fp8", "plan_qdq",
    "qdq_scales", "quantize_fp8", "quantize_int8", "quantize_qdq", "read_tensor", "weight_uses",
]
