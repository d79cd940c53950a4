"""Walk vocabulary and ONNX passes."""

from walkforge.graphs.walk import GraphEdge, GraphNode, Loop, Sequential, TensorSpec

__all__ = ["GraphEdge", "GraphNode", "Loop", "Sequential", "TensorSpec"]
