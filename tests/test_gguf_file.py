"""backends/core/gguf_file.py against gguf-py's GGUFReader, the reference: the same metadata
values and the same tensors (type, dims, offsets, typed and shaped data), on the default model
and on files written with gguf-py's writer (every value type, both byte orders, a custom
alignment); and a damaged file fails with a ValueError, never reads past its end."""
from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType, GGUFEndian, GGUFValueType

from backends.core.gguf_file import GGUFFile, read_metadata


def assert_same_as_gguf_py(path: Path) -> GGUFFile:
    ref = gguf.GGUFReader(path)
    ours = GGUFFile(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(want)
    for key, value in want.items():
        assert ours.fields[key] == value, key
        assert type(ours.fields[key]) is type(value), key
    assert ours.data_offset == ref.data_offset and ours.alignment == ref.alignment
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ref.tensors, ours.tensors):
        assert (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset) == \
            (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset)
        assert b.shape.tolist() == a.shape.tolist()
        assert b.data.dtype == a.data.dtype and b.data.shape == a.data.shape, a.name
        np.testing.assert_array_equal(b.data, a.data)
        assert not b.data.flags.writeable
    return ours


def test_the_default_model_reads_as_gguf_py_reads_it_and_much_faster(gguf_path):
    ours = assert_same_as_gguf_py(gguf_path)
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152
    assert {t.tensor_type.name for t in ours.tensors} >= {"Q4_1", "F32"}
    t0 = time.perf_counter()
    gguf.GGUFReader(gguf_path)
    theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    GGUFFile(gguf_path)
    mine = time.perf_counter() - t0
    assert mine < theirs / 4, (mine, theirs)         # 0.12 s against 3.7 s on a 2.25 GHz core


def _write(path: Path, endian: GGUFEndian = GGUFEndian.LITTLE, alignment: int | None = None) -> None:
    w = gguf.GGUFWriter(path, "llama", endianess=endian)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-6)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "ŝ", "Ġthe"])
    w.add_key_value("t.bools", [True, False], GGUFValueType.ARRAY, GGUFValueType.BOOL)
    w.add_array("t.none", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 5, 32)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    q8 = rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8)          # 4 rows of 64 Q8_0 weights
    w.add_tensor("q8", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG], ids=["little", "big"])
@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_kind_reads_as_gguf_py_reads_it(tmp_path, endian, alignment):
    path = tmp_path / "t.gguf"
    _write(path, endian, alignment)
    ours = assert_same_as_gguf_py(path)
    assert ours.fields["t.str"] == "héllo ✓" and ours.fields["t.strs"] == ["a", "", "ŝ", "Ġthe"]
    assert ours.fields["t.u64"] == 2**63 + 5 and ours.fields["t.bools"] == [True, False]
    assert ours.alignment == (alignment or 32) and ours.data_offset % ours.alignment == 0
    q8 = next(t for t in ours.tensors if t.name == "q8")
    assert q8.data.shape == (4, 68) and q8.shape.tolist() == [64, 4]
    assert read_metadata(path, "t.i") == {"t.i8": -5, "t.i16": -30000, "t.i32": -2_000_000_000,
                                          "t.i64": -(2**62), "t.ints": [1, -2, 3]}


def test_nested_arrays_are_nested_lists(tmp_path):
    path = tmp_path / "n.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_array("t.nested", [[1, 2], [3]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert GGUFFile(path).fields["t.nested"] == [[1, 2], [3]]


def test_a_zero_dim_tensor_reads_as_gguf_py_reads_it(tmp_path):
    path = tmp_path / "z.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("scalar", np.array(3.5, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = assert_same_as_gguf_py(path).tensors[0]
    assert t.shape.tolist() == [] and t.data.shape == () and float(t.data) == 3.5


def test_a_value_that_is_not_utf8_does_not_fail_the_load(tmp_path):
    """gguf-py fails only when such a value is read; here it keeps its bytes as surrogates, so a
    field no loader reads (a description, say) cannot stop a model from loading."""
    path = tmp_path / "t.gguf"
    _write(path)
    raw = bytearray(path.read_bytes())
    at = raw.index("héllo ✓".encode())
    raw[at] = 0xFF
    path.write_bytes(raw)
    f = GGUFFile(path)
    assert f.fields["t.str"].startswith("\udcff") and f.fields["t.strs"] == ["a", "", "ŝ", "Ġthe"]
    with pytest.raises(UnicodeDecodeError):
        gguf.GGUFReader(path).fields["t.str"].contents()


def test_arrays_nested_past_the_limit_are_refused(tmp_path):
    """An array of arrays 3,000 deep (36 KB) would exhaust Python's recursion: a ValueError."""
    def nested(depth: int) -> bytes:
        out = b""
        for _ in range(depth):              # type ARRAY, count 1 (the value of each level)
            out += struct.pack("<IQ", GGUFValueType.ARRAY, 1)
        return out + struct.pack("<IQ", GGUFValueType.INT32, 0)     # innermost: no ints
    for depth, ok in ((8, True), (3000, False)):
        body = struct.pack("<Q", 1) + b"x" + struct.pack("<I", GGUFValueType.ARRAY) + nested(depth)
        path = tmp_path / f"n{depth}.gguf"
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
        if ok:
            value = GGUFFile(path).fields["x"]
            for _ in range(depth):
                assert isinstance(value, list) and len(value) == 1
                value = value[0]
            assert value == []
        else:
            with pytest.raises(ValueError, match="nested deeper"):
                GGUFFile(path)


def test_a_damaged_file_fails_with_a_value_error_at_every_cut(tmp_path):
    path = tmp_path / "t.gguf"
    _write(path)
    raw = path.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in GGUFFile(path).tensors)    # then padding
    bad = tmp_path / "bad.gguf"
    for cut in sorted({0, 3, 4, 8, 16, 24, 30, 100, 300, len(raw) // 2, end - 1}):
        bad.write_bytes(raw[:cut])
        if cut == 0:
            with pytest.raises(ValueError):         # numpy cannot map an empty file
                GGUFFile(bad)
            continue
        with pytest.raises(ValueError, match="truncated|past the end|exceeds|bad magic"):
            GGUFFile(bad)


def test_bad_magic_version_and_lengths_are_named(tmp_path):
    path = tmp_path / "t.gguf"
    _write(path)
    raw = bytearray(path.read_bytes())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + raw[4:])
    with pytest.raises(ValueError, match="bad magic"):
        GGUFFile(bad)
    bad.write_bytes(raw[:4] + (9).to_bytes(4, "little") + raw[8:])
    with pytest.raises(ValueError, match="version 9"):
        GGUFFile(bad)
    # the first key's length (after magic, version, two counts) claims more than the file holds
    bad.write_bytes(raw[:24] + (2**40).to_bytes(8, "little") + raw[32:])
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(bad)
    # the first tensor's data offset moved past the end of the file
    ours = GGUFFile(path)
    rel = ours.tensors[0].data_offset - ours.data_offset
    at = raw.index((3).to_bytes(8, "little") + b"f32") + 8 + 3 + 4 + 2 * 8 + 4   # name, n_dims, dims, type
    assert int.from_bytes(raw[at:at + 8], "little") == rel
    bad.write_bytes(raw[:at] + (len(raw) * 2 // 32 * 32).to_bytes(8, "little") + raw[at + 8:])
    with pytest.raises(ValueError, match="past the end"):
        GGUFFile(bad)
