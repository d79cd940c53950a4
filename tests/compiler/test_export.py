"""Export a walk from a weightless (meta) module; its weights arrive from safetensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.torch import save_file
from tolerances import fp32_tol, rel_err

from walkforge.compiler.export import export_walk, on_meta, trace_walk
from walkforge.graphs.walk import GraphNode, TensorSpec

# rel_err of onnxruntime vs torch, fp32: the longest sum is the 32-term down-projection (5.4e-6);
# weights attached transposed the wrong way or to the wrong node would give 1e-1 and more
ORT_VS_TORCH_TOL = fp32_tol(32)


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(6, 32), torch.nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def walk(module: torch.nn.Module) -> GraphNode:
    """[B, 4, 6] tokens: a 3-D input makes each Linear a MatMul behind a Transpose of its weight."""
    return GraphNode("mlp", module, (TensorSpec("x", "float32", ("batch", 4, 6)),),
                     (TensorSpec("y", "float32", ("batch", 4, 6)),), {"x": torch.randn(2, 4, 6)})


def test_meta_walk_has_no_initializers_until_attached(tmp_path: Path) -> None:
    torch.manual_seed(0)
    real = Mlp().eval()
    save_file(real.state_dict(), str(tmp_path / "weights.safetensors"))
    with torch.device("meta"):
        node = walk(Mlp())
    trace_walk(node, tmp_path / "bare.onnx")
    bare = onnx.load(str(tmp_path / "bare.onnx"))
    assert len(bare.graph.initializer) == 0 and not (tmp_path / "bare.onnx.data").exists()

    ops, counts = export_walk(node, tmp_path / "mlp.onnx", tmp_path / "weights.safetensors")
    assert (tmp_path / "mlp.onnx.data").stat().st_size >= counts["bytes"] == 4 * (6 * 32 * 2 + 32 + 6)
    model = onnx.load(str(tmp_path / "mlp.onnx"), load_external_data=False)
    names = {t.name for t in model.graph.initializer}
    assert names == {"up.weight_t", "up.bias", "down.weight_t", "down.bias"}
    assert ops.get("Transpose", 0) == 0 and ops["MatMul"] == 2
    x = np.random.default_rng(1).standard_normal((5, 4, 6)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "mlp.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    with torch.no_grad():
        assert rel_err(got, real(torch.from_numpy(x))) <= ORT_VS_TORCH_TOL


def test_real_module_exports_without_being_moved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    real = Mlp().eval()
    before = {k: v.clone() for k, v in real.state_dict().items()}
    _, counts = export_walk(walk(real), tmp_path / "mlp.onnx")
    assert counts["initializers"] == 4 and (tmp_path / "mlp.onnx.data").exists()
    assert all(torch.equal(before[k], v) for k, v in real.state_dict().items())
    meta = on_meta(real)
    assert all(p.is_meta for p in meta.parameters()) and on_meta(meta) is meta
