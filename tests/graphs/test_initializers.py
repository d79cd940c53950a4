"""Attaching weights to a graph exported on the meta device, streamed from safetensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file
from tolerances import fp32_tol, rel_err

from walkforge.compiler.export import trace_walk
from walkforge.errors import WalkforgeError
from walkforge.graphs.initializers import ALIGNMENT, attach_initializers
from walkforge.graphs.walk import GraphNode, TensorSpec

# rel_err of onnxruntime vs torch, fp32: the longest sum is fc2's 640 terms (2.4e-5); a weight left
# untransposed or streamed from the wrong offset gives 1e-1 and more
ORT_VS_TORCH_TOL = fp32_tol(640)


class Net(torch.nn.Module):
    """Conv (weight used as is), a LayerNorm, three Linears (weights behind a Transpose; fc2's
    1.6 MB weight is above the alignment threshold)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(8, 640), torch.nn.Linear(640, 640),
                                        torch.nn.Linear(640, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)  # [B, HW, 8]
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(self.norm(h))))))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Net, Path, Path]:
    """(torch net, its weights as safetensors, its graph traced on meta without weights)."""
    torch.manual_seed(0)
    net = Net().eval()
    root = tmp_path_factory.mktemp("attach")
    save_file(net.state_dict(), str(root / "weights.safetensors"))
    node = GraphNode("net", net, (TensorSpec("x", "float32", ("batch", 3, 5, 5)),),
                     (TensorSpec("y", "float32", ("batch", 25, 4)),), {"x": torch.randn(2, 3, 5, 5)})
    trace_walk(node, root / "net.onnx")
    return net, root / "weights.safetensors", root / "net.onnx"


@pytest.fixture(scope="module")
def attached(exported) -> tuple[onnx.ModelProto, dict[str, int], Path]:
    net, weights, path = exported
    model, counts = attach_initializers(onnx.load(str(path)), weights, f"{path}.data")
    out = path.with_name("attached.onnx")  # same directory as net.onnx.data
    onnx.save(model, str(out))
    return model, counts, out


def test_counts(attached, exported) -> None:
    _, counts, _ = attached
    net = exported[0]
    assert counts == {"initializers": len(net.state_dict()), "transposes_folded": 3, "inputs_removed": 0,
                      "bytes": sum(t.numel() * 4 for t in net.state_dict().values())}


def test_values_equal_safetensors_with_transposes_folded(attached, exported) -> None:
    model, _, path = attached
    tensors = load_file(str(exported[1]))
    inits = {t.name: numpy_helper.to_array(t, str(path.parent)) for t in model.graph.initializer}
    linear = {f"fc{i}.weight" for i in (1, 2, 3)}
    assert set(inits) == (set(tensors) - linear) | {f"{k}_t" for k in linear}
    for name, tensor in tensors.items():
        if name in linear:
            np.testing.assert_array_equal(inits[f"{name}_t"], tensor.numpy().T)
        else:
            np.testing.assert_array_equal(inits[name], tensor.numpy())
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_no_transpose_on_weights_and_no_weight_inputs(attached) -> None:
    model, _, _ = attached
    inits = {t.name for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    assert matmul_weights == {"fc1.weight_t", "fc2.weight_t", "fc3.weight_t"}
    assert [v.name for v in model.graph.input] == ["x"]


def test_large_tensors_aligned(attached) -> None:
    model, _, _ = attached
    spans = [{e.key: int(e.value) for e in t.external_data if e.key != "location"}
             for t in model.graph.initializer]
    large = [s for s in spans if s["length"] > 1 << 20]
    assert len(large) == 1 and large[0]["offset"] % ALIGNMENT == 0


def test_checker_and_onnxruntime_match_torch(attached, exported) -> None:
    path = attached[2]
    onnx.checker.check_model(str(path))
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        want = exported[0](x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    assert rel_err(got, want) <= ORT_VS_TORCH_TOL


def test_weights_listed_as_inputs_stop_being_inputs(exported, tmp_path: Path) -> None:
    _, weights, path = exported
    model = onnx.load(str(path))
    model.graph.input.append(onnx.helper.make_tensor_value_info("conv.weight", onnx.TensorProto.FLOAT, None))
    model, counts = attach_initializers(model, weights, tmp_path / "w.data")
    assert counts["inputs_removed"] == 1
    assert [v.name for v in model.graph.input] == ["x"]
    assert "conv.weight" in {t.name for t in model.graph.initializer}


def test_missing_weight_named(exported, tmp_path: Path) -> None:
    _, weights, path = exported
    partial = {k: v for k, v in load_file(str(weights)).items() if k != "norm.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WalkforgeError, match="not in the weights file: norm.bias"):
        attach_initializers(onnx.load(str(path)), tmp_path / "partial.safetensors", tmp_path / "w.data")
