import json
import os

import numpy as np
import pytest

from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.data.shards import TokenDataset, read_shard, rng_from_state, rng_state, shard_name, write_shard


@pytest.mark.parametrize("name, dtype, high", [("data00.bin", "<u2", 65535), ("data00.u32.bin", "<u4", 70000)])
def test_write_read_roundtrip(tmp_path, name, dtype, high):
    ids = np.random.default_rng(0).integers(0, high + 1, size=1000)
    path = tmp_path / name
    write_shard(path, ids)
    assert os.path.getsize(path) == 1000 * np.dtype(dtype).itemsize
    assert (np.fromfile(path, dtype=dtype) == ids).all()  # oracle: raw little-endian file
    assert (read_shard(path, vocab_size=high + 1) == ids).all()
    assert os.listdir(tmp_path) == [name]  # no temp file left behind


def test_shard_name_switches_dtype_past_uint16():
    assert shard_name(3, 32000) == "data03.bin"
    assert shard_name(0, 65536) == "data00.bin"
    assert shard_name(0, 65537) == "data00.u32.bin"


@pytest.mark.parametrize("bad", [65536, -1])
def test_write_id_does_not_fit(tmp_path, bad):
    with pytest.raises(ShapeError, match=f"token id {bad} does not fit uint16"):
        write_shard(tmp_path / "data00.bin", [1, 2, bad])


def test_read_corrupt_shards(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(FormatError, match="odd.bin: 3 bytes is not a whole number of uint16"):
        read_shard(odd)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(FormatError, match="empty.bin: shard file is empty"):
        read_shard(tmp_path / "empty.bin")
    with pytest.raises(FormatError, match="missing.bin: shard file does not exist"):
        read_shard(tmp_path / "missing.bin")
    write_shard(tmp_path / "big.bin", [1, 5, 300, 7])
    with pytest.raises(FormatError, match="big.bin: token id 300 at position 2 is outside the vocabulary"):
        read_shard(tmp_path / "big.bin", vocab_size=258)
    with pytest.raises(FormatError, match="shard names end in"):
        read_shard(tmp_path / "data.txt")


def _positions_shard(tmp_path, n, name="data00.bin"):
    """A shard whose token at position i is i: a window's values say where it was cut from."""
    write_shard(tmp_path / name, np.arange(n))
    return np.arange(n)


def test_split_is_disjoint_and_windows_are_contiguous(tmp_path):
    n, T = 1000, 16
    _positions_shard(tmp_path, n)
    train = TokenDataset(tmp_path, T, "train", val_fraction=0.2)
    val = TokenDataset(tmp_path, T, "val", val_fraction=0.2)
    assert len(train) == 800 and len(val) == 200
    rng = np.random.default_rng(1)
    for ds, lo, hi in ((train, 0, 800), (val, 800, 1000)):
        x = ds.sample_batch(rng, 256)
        assert x.shape == (256, T + 1) and x.dtype == np.int64
        assert (x == x[:, :1] + np.arange(T + 1)).all()
        assert x.min() >= lo and x.max() < hi


def test_every_window_reachable_and_weighted_by_length(tmp_path):
    T = 4
    write_shard(tmp_path / "data00.bin", np.arange(0, 14))       # 10 windows
    write_shard(tmp_path / "data01.bin", np.arange(100, 134))    # 30 windows
    ds = TokenDataset(tmp_path, T, val_fraction=0.0)
    starts = ds.sample_batch(np.random.default_rng(2), 8000)[:, 0]
    assert set(starts.tolist()) == set(range(0, 10)) | set(range(100, 130))
    frac_first = (starts < 100).mean()
    assert abs(frac_first - 0.25) < 0.03  # 10 of 40 windows


def test_resume_from_rng_state_through_json(tmp_path):
    _positions_shard(tmp_path, 5000)
    ds = TokenDataset(tmp_path, 32)
    rng = np.random.default_rng(1234)
    ds.sample_batch(rng, 8)
    saved = json.loads(json.dumps(rng_state(rng)))  # what a checkpoint stores
    uninterrupted = [ds.sample_batch(rng, 8) for _ in range(5)]
    resumed_rng = rng_from_state(saved)
    resumed = [ds.sample_batch(resumed_rng, 8) for _ in range(5)]
    assert all((a == b).all() for a, b in zip(uninterrupted, resumed))
    again = TokenDataset(tmp_path, 32)
    assert (again.sample_batch(np.random.default_rng(1234), 8) == ds.sample_batch(np.random.default_rng(1234), 8)).all()


def test_iter_batches_covers_split_without_overlap(tmp_path):
    _positions_shard(tmp_path, 1000)
    val = TokenDataset(tmp_path, 10, "val", val_fraction=0.1)
    rows = np.concatenate(list(val.iter_batches(4)))
    assert (rows[:, 0] == 900 + 10 * np.arange(9)).all()  # starts 900, 910, ..., 980 (990 lacks T+1 tokens)
    assert len(list(val.iter_batches(4, max_batches=1))) == 1


def test_seq_len_longer_than_data(tmp_path):
    _positions_shard(tmp_path, 100)
    with pytest.raises(ConfigError, match=r"seq_len 200 needs 201 tokens .*data00.bin\) has 90"):
        TokenDataset(tmp_path, 200)
    with pytest.raises(ConfigError, match=r"seq_len 20 needs 21 tokens in one shard's val part"):
        TokenDataset(tmp_path, 20, "val", val_fraction=0.1)


def test_meta_defaults_and_vocab_check(tmp_path):
    write_shard(tmp_path / "data00.bin", np.arange(200) % 50)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 40, "val_fraction": 0.5}))
    with pytest.raises(FormatError, match="token id 40 at position 40"):
        TokenDataset(tmp_path, 8)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50, "val_fraction": 0.5}))
    ds = TokenDataset(tmp_path, 8, "val")
    assert (ds.vocab_size, ds.val_fraction, len(ds)) == (50, 0.5, 100)
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(FormatError, match="meta.json"):
        TokenDataset(tmp_path, 8)


def test_llama2c_shards_and_tokenizer_bin_in_dir(tmp_path):
    """llama2.c writes plain uint16 with ndarray.tofile; its tokenizer.bin in the same dir is not a shard."""
    ids = np.random.default_rng(3).integers(0, 32000, size=500).astype(np.uint16)
    ids.tofile(tmp_path / "data00.bin")
    (tmp_path / "tokenizer.bin").write_bytes(b"\x00" * 7)
    ds = TokenDataset(tmp_path, 16, val_fraction=0.0, vocab_size=32000)
    assert ds.paths == [str(tmp_path / "data00.bin")]
    x = ds.sample_batch(np.random.default_rng(0), 3)
    for row in x:  # each row is a contiguous slice of the file
        starts = np.flatnonzero(ids[: len(ids) - 16] == row[0])
        assert any((ids[s:s + 17] == row).all() for s in starts)


def test_missing_sources(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        TokenDataset(tmp_path / "nope", 8)
    with pytest.raises(FormatError, match="holds no shards"):
        TokenDataset(tmp_path, 8)
    write_shard(tmp_path / "data00.bin", np.arange(100))
    with pytest.raises(ConfigError, match="val split is empty"):
        TokenDataset(tmp_path, 8, split="val", val_fraction=0.0)
    with pytest.raises(ConfigError, match="split must be"):
        TokenDataset(tmp_path, 8, split="test")


def test_rng_state_names_only_allowed_bit_generators():
    state = rng_state(np.random.default_rng(3))
    for bad in ("seed", "get_state", "__class__", None, 7):
        with pytest.raises(FormatError, match=r"ckpt: bit_generator must be one of PCG64"):
            rng_from_state(dict(state, bit_generator=bad), where="ckpt")
    with pytest.raises(FormatError, match=r"ckpt: bit_generator"):
        rng_from_state(["PCG64"], where="ckpt")
    with pytest.raises(FormatError, match=r"ckpt: not a valid PCG64 state"):
        rng_from_state(dict(state, state="garbage"), where="ckpt")
    mt = np.random.Generator(np.random.MT19937(5))
    again = rng_from_state(rng_state(mt))
    assert again.integers(0, 1000, 5).tolist() == mt.integers(0, 1000, 5).tolist()
