"""msgpack-numpy codec: round trips, byte-for-byte equality with openpi-client, refusals."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from walkforge.errors import WalkforgeError
from walkforge.serving import protocol

VALUES = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "u8": np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    "i64": np.array([-1, 2**40], dtype=np.int64),
    "bool": np.array([True, False]),
    "f64_be": np.arange(3, dtype=">f8"),
    "empty": np.zeros((0, 5), np.float32),
    "scalar0d": np.array(3.5, np.float32),
    "generic": np.float32(2.5),
    "strided": np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2],
    "text": "pick up the cube",
    "nested": {"a": [1, 2.0, "x"], "b": np.int16(-3)},
}


def test_round_trip_keeps_values_dtypes_and_shapes():
    back = protocol.unpackb(protocol.packb(VALUES))
    for key, want in VALUES.items():
        got = back[key]
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and got.shape == want.shape, key
            np.testing.assert_array_equal(got, want)
        elif isinstance(want, np.generic):
            assert type(got) is type(want) and got == want, key
    assert back["text"] == VALUES["text"] and back["nested"]["a"] == [1, 2.0, "x"]
    assert back["nested"]["b"] == np.int16(-3) and back["nested"]["b"].dtype == np.int16


def test_array_layout_is_openpis_tagged_map():
    raw = msgpack.unpackb(protocol.packb(np.arange(3, dtype=np.float32)))
    assert raw == {b"__ndarray__": True, b"data": np.arange(3, dtype=np.float32).tobytes(),
                   b"dtype": "<f4", b"shape": [3]}


def test_bytes_equal_openpi_clients_packer(openpi_python, tmp_path):
    """The real openpi-client (its own venv, numpy 1.x) packs the same dict to the same bytes, and
    decodes ours."""
    script = tmp_path / "pack.py"
    script.write_text(
        "import sys, numpy as np\n"
        "from openpi_client import msgpack_numpy as m\n"
        "v = {'f32': np.arange(12, dtype=np.float32).reshape(3, 4), 'u8': np.arange(24, dtype=np.uint8)"
        ".reshape(2, 3, 4), 'generic': np.float32(2.5), 'text': 'pick', 'n': {'b': np.int16(-3)}}\n"
        "open(sys.argv[1], 'wb').write(m.packb(v))\n"
        "ours = m.unpackb(open(sys.argv[2], 'rb').read())\n"
        "assert (ours['f32'] == v['f32']).all() and ours['u8'].dtype == np.uint8, ours\n")
    values = {"f32": VALUES["f32"], "u8": VALUES["u8"], "generic": VALUES["generic"], "text": "pick",
              "n": {"b": np.int16(-3)}}
    (tmp_path / "ours.bin").write_bytes(protocol.packb(values))
    openpi_python(script, tmp_path / "theirs.bin", tmp_path / "ours.bin")
    assert (tmp_path / "theirs.bin").read_bytes() == protocol.packb(values)


@pytest.mark.parametrize("value", [np.array([1 + 2j]), np.array([object()], dtype=object),
                                   np.zeros(2, dtype=[("a", "<f4")])])
def test_refuses_to_pack_object_void_complex(value):
    with pytest.raises(WalkforgeError, match="cannot send"):
        protocol.packb({"x": value})


def tagged(**fields) -> bytes:
    base = {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "<f4", b"shape": [2]}
    return msgpack.packb({"x": base | {k.encode(): v for k, v in fields.items()}})


@pytest.mark.parametrize("frame, says", [
    (b"\xc1", "not a msgpack-numpy message"),
    (msgpack.packb({"a": 1}) + b"\x00", "not a msgpack-numpy message"),
    (tagged(dtype="|O"), "object arrays"),
    (tagged(dtype="<c8"), "complex arrays"),
    (tagged(dtype="nonsense"), "unknown array dtype"),
    (tagged(dtype=7), "dtype must be a string"),
    (tagged(data=b"\0" * 7), "needs 8 bytes, got 7"),
    (tagged(data="text"), "must be msgpack bin"),
    (tagged(shape=[-2]), "non-negative ints"),
    (tagged(shape="2"), "non-negative ints"),
])
def test_malformed_frames_are_one_line_errors(frame, says):
    with pytest.raises(WalkforgeError, match=says):
        protocol.unpackb(frame)
