"""MILBlob v2 writer/reader vs coremltools' own blob writer and the seed's header bytes."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fusegrad.backends.ane.blob import BlobWriter, blob_offsets, read_blob
from fusegrad.core.errors import FormatError

storage = pytest.importorskip("coremltools.libmilstoragepython")

WRITE = {np.float16: "write_fp16_data", np.float32: "write_float_data",
         np.int8: "write_int8_data", np.uint8: "write_uint8_data"}


def coremltools_bytes(tmp_path, arrays):
    path = str(tmp_path / "ref.bin")
    writer = storage._BlobStorageWriter(path)
    # write_fp16_data takes the fp16 bit patterns as uint16 (a float16 array would be value-cast)
    offsets = [getattr(writer, WRITE[a.dtype.type])(a.reshape(-1).view(np.uint16) if a.dtype == np.float16
                                                    else a.reshape(-1)) for a in arrays]
    del writer  # the file is flushed when the writer is destroyed
    with open(path, "rb") as f:
        return f.read(), offsets


def ours(arrays):
    w = BlobWriter()
    offsets = [w.add(a) for a in arrays]
    return w.to_bytes(), offsets


def test_mixed_dtypes_match_coremltools_byte_for_byte(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(6).astype(np.float16), rng.standard_normal(3).astype(np.float32),
              rng.integers(-128, 127, 5).astype(np.int8), rng.integers(0, 255, 70).astype(np.uint8),
              rng.standard_normal((4, 8, 1, 1)).astype(np.float16)]
    ref, ref_offsets = coremltools_bytes(tmp_path, arrays)
    got, offsets = ours(arrays)
    assert offsets == ref_offsets
    assert got == ref


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(WRITE)), st.integers(1, 150)), min_size=1, max_size=5))
def test_any_blob_sequence_matches_coremltools(tmp_path_factory, specs):
    rng = np.random.default_rng(len(specs))
    arrays = [(rng.standard_normal(n) * 50).astype(dt) for dt, n in specs]
    ref, ref_offsets = coremltools_bytes(tmp_path_factory.mktemp("blob"), arrays)
    got, offsets = ours(arrays)
    assert (got, offsets) == (ref, ref_offsets)
    assert blob_offsets(got) == offsets
    for a, off in zip(arrays, offsets):
        np.testing.assert_array_equal(read_blob(got, off), a)


def test_seed_header_bytes():
    # the seed's build_blob_t: buf[0]=1, buf[4]=2, DEADBEEF at 64, dtype 1 at 68, size at 72, 128 at 80
    rows, cols = 5, 3
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    buf, (offset,) = ours([w.T.astype(np.float16)])
    assert offset == 64 and buf[0] == 1 and buf[4] == 2
    assert buf[64:68] == bytes([0xEF, 0xBE, 0xAD, 0xDE]) and buf[68] == 1
    assert struct.unpack_from("<I", buf, 72)[0] == rows * cols * 2
    assert struct.unpack_from("<I", buf, 80)[0] == 128
    assert len(buf) == 128 + rows * cols * 2
    # seed layout: fp16[j*rows + i] = w[i*cols + j]
    data = np.frombuffer(buf, np.float16, offset=128)
    assert all(data[j * rows + i] == w[i, j] for i in range(rows) for j in range(cols))


def test_reader_names_the_fault():
    buf, _ = ours([np.ones(4, np.float16)])
    with pytest.raises(FormatError, match="sentinel"):
        read_blob(buf[:64] + b"\0" * 4 + buf[68:], 64)
    with pytest.raises(FormatError, match="shape"):
        read_blob(buf, 64, (3, 2))
    with pytest.raises(FormatError, match="unsupported dtype"):
        BlobWriter().add(np.ones(2, np.float64))
