"""Pretokenized shards (llama2.c style) and random (B, T+1) training windows read by memory map.

A shard is a flat array of little-endian token ids with BOS before each document, no header.
The dtype is in the file name: `*.bin` holds uint16 (llama2.c's own shards read unchanged),
`*.u32.bin` holds uint32 (for vocabularies larger than 65536). A shard directory is every `*.bin`
in it except `tokenizer.bin`, sorted by name, plus an optional meta.json written by `prepare`
(vocab_size, val_fraction) that TokenDataset uses for its defaults and to check ids.

The train/validation split is by position: the last `val_fraction` of every shard is validation,
so it is deterministic, needs no extra files, and no window straddles the two. A meta.json with layout
"llama2c" (what `prepare` writes for a folder of llama2.c's shards) lists shards elsewhere and follows
llama2.c's convention instead: the first shard is validation, the others are training.

>>> import numpy as np, tempfile, os
>>> d = tempfile.mkdtemp()
>>> write_shard(os.path.join(d, "data00.bin"), np.arange(100) % 7)
>>> ds = TokenDataset(d, seq_len=8, val_fraction=0.1)
>>> rng = np.random.default_rng(0)
>>> ds.sample_batch(rng, 4).shape
(4, 9)
>>> state = rng_state(rng); a = ds.sample_batch(rng, 4)
>>> bool((ds.sample_batch(rng_from_state(state), 4) == a).all())
True
"""
import glob
import os
import re

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.core.fileio import atomic_write_bytes, read_json_object

U32_SUFFIX = ".u32.bin"
META_FILE = "meta.json"
DEFAULT_VAL_FRACTION = 0.1
LLAMA2C_LAYOUT = "llama2c"
LLAMA2C_SHARD = re.compile(r"^data\d+\.bin$")
LLAMA2C_TOKENIZER = re.compile(r"^(tokenizer|tok\d+)\.(bin|model)$")


def shard_dtype(path):
    """np.dtype of a shard from its name: *.u32.bin -> uint32, *.bin -> uint16."""
    name = os.path.basename(os.fspath(path))
    if name.endswith(U32_SUFFIX):
        return np.dtype("<u4")
    if name.endswith(".bin"):
        return np.dtype("<u2")
    raise FormatError(f"{path}: shard names end in .bin (uint16) or {U32_SUFFIX} (uint32)")


def shard_name(index, vocab_size):
    """File name of shard `index` for a vocabulary of `vocab_size`: data00.bin, or data00.u32.bin past 65536."""
    return f"data{index:02d}" + (U32_SUFFIX if vocab_size > 65536 else ".bin")


def write_shard(path, ids):
    """Write token ids atomically in the dtype the file name says; ids that do not fit raise ShapeError."""
    dtype = shard_dtype(path)
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ShapeError(f"write_shard {path}: ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.size == 0:
        raise ShapeError(f"write_shard {path}: no tokens to write")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi > np.iinfo(dtype).max:
        bad = lo if lo < 0 else hi
        raise ShapeError(f"write_shard {path}: token id {bad} does not fit {dtype.name}"
                         f"{' (use a ' + U32_SUFFIX + ' name)' if bad > 0 else ''}")
    atomic_write_bytes(path, ids.astype(dtype).tobytes())


def read_shard(path, vocab_size=None):
    """Memory-map one shard; FormatError names the file when it is missing, empty, ragged or has ids >= vocab_size."""
    dtype = shard_dtype(path)
    if not os.path.isfile(path):
        raise FormatError(f"{path}: shard file does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise FormatError(f"{path}: shard file is empty")
    if size % dtype.itemsize:
        raise FormatError(f"{path}: {size} bytes is not a whole number of {dtype.name} token ids "
                          f"(truncated or not a shard)")
    ids = np.memmap(path, dtype=dtype, mode="r")
    if vocab_size is not None:
        hi = int(ids.max())
        if hi >= vocab_size:
            at = int(np.argmax(ids >= vocab_size))
            raise FormatError(f"{path}: token id {int(ids[at])} at position {at} is outside the vocabulary "
                              f"(vocab_size {vocab_size})")
    return ids


def list_shards(source):
    """Shard paths from a directory, one file, or a list of files (sorted, tokenizer.bin skipped)."""
    if isinstance(source, (list, tuple)):
        paths = [os.fspath(p) for p in source]
    elif os.path.isdir(source):
        paths = sorted(p for p in glob.glob(os.path.join(os.fspath(source), "*.bin"))
                       if os.path.basename(p) != "tokenizer.bin")
        if not paths:
            raise FormatError(f"{source}: directory holds no shards (*.bin files)")
    elif os.path.exists(source):
        paths = [os.fspath(source)]
    else:
        raise FormatError(f"{source}: shard file or directory does not exist")
    if not paths:
        raise FormatError("no shard files given")
    return paths


def check_llama2c_shards(directory, vocab_size, tokenizer_name):
    """[(path, tokens)] of llama2.c's uint16 shards in `directory`, sorted, each checked: a name that is not
    dataNN.bin, a file of odd size, ids >= vocab_size, or uint32 ids (every other uint16 zero) are errors."""
    names = sorted(os.listdir(directory))
    stray = [n for n in names if n.endswith(".bin") and not LLAMA2C_SHARD.match(n) and not LLAMA2C_TOKENIZER.match(n)]
    if stray:
        raise FormatError(f"{os.path.join(directory, stray[0])}: not a llama2.c shard (dataNN.bin); a folder of "
                          f"shards holds only those (and its tokenizer)")
    paths = [os.path.join(directory, n) for n in names if LLAMA2C_SHARD.match(n)]
    if len(paths) < 2:
        raise FormatError(f"{directory}: {len(paths)} llama2.c shard(s); llama2.c's first shard is the validation "
                          f"split, so training needs at least 2")
    shards = []
    for path in paths:
        try:
            ids = read_shard(path, vocab_size)
        except FormatError as e:
            if "outside the vocabulary" not in str(e):
                raise
            raise FormatError(f"{e}; the tokenizer {tokenizer_name!r} has {vocab_size} ids: pass the tokenizer the "
                              f"shards were made with (--tokenizer: llama2.c's tokenizer.model, or tok<N>.model for "
                              f"its custom vocabularies)") from None
        head = ids[:8192]
        if len(head) >= 64 and np.count_nonzero(head[1::2] == 0) > 0.9 * (len(head) // 2):
            raise FormatError(f"{path}: every other uint16 id is 0: these look like uint32 ids; llama2.c's shards are "
                              f"uint16 (name uint32 shards *{U32_SUFFIX})")
        shards.append((path, len(ids)))
    return shards


def read_meta(directory):
    """meta.json of a shard directory as a dict ({} when absent); FormatError when it is corrupt."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        return {}
    return read_json_object(path, "shard metadata")


class TokenDataset:
    """The train or val part of a set of shards, sampled as windows of seq_len + 1 tokens.

    vocab_size and val_fraction default to the directory's meta.json (else: unchecked, 0.1).
    Sampling takes an explicit np.random.Generator so a checkpoint can store its state
    (`rng_state`) and resume to the identical batch sequence (`rng_from_state`).
    """

    def __init__(self, source, seq_len, split="train", val_fraction=None, vocab_size=None):
        if split not in ("train", "val"):
            raise ConfigError(f"TokenDataset: split must be 'train' or 'val', got {split!r}")
        if seq_len < 1:
            raise ConfigError(f"TokenDataset: seq_len must be >= 1, got {seq_len}")
        meta = read_meta(source) if not isinstance(source, (list, tuple)) and os.path.isdir(source) else {}
        self.vocab_size = vocab_size if vocab_size is not None else meta.get("vocab_size")
        self.val_fraction = val_fraction if val_fraction is not None else meta.get("val_fraction", DEFAULT_VAL_FRACTION)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"TokenDataset: val_fraction must be in [0, 1), got {self.val_fraction}")
        if split == "val" and self.val_fraction == 0:
            raise ConfigError(f"TokenDataset {source}: the val split is empty because val_fraction is 0")
        self.seq_len, self.split = seq_len, split
        self.segments = []  # (path, memmap view) for this split
        if meta.get("layout") == LLAMA2C_LAYOUT:  # whole shards: llama2.c's first shard is validation
            paths = [s["file"] for s in meta["shards"]]
            self.paths = paths[1:] if split == "train" else paths[:1]
            self.segments = [(path, read_shard(path, self.vocab_size)) for path in self.paths]
        else:
            self.paths = list_shards(source)
            for path in self.paths:
                ids = read_shard(path, self.vocab_size)
                cut = len(ids) - int(round(len(ids) * self.val_fraction))
                self.segments.append((path, ids[:cut] if split == "train" else ids[cut:]))
        self.n_tokens = sum(len(s) for _, s in self.segments)
        # A window starts at any of len - seq_len positions; segments too short contribute none.
        windows = np.array([max(len(s) - seq_len, 0) for _, s in self.segments], dtype=np.int64)
        if windows.sum() == 0:
            longest = max(self.segments, key=lambda ps: len(ps[1]))
            raise ConfigError(f"TokenDataset: seq_len {seq_len} needs {seq_len + 1} tokens in one shard's {split} "
                             f"part, but the longest ({longest[0]}) has {len(longest[1])} "
                             f"(val_fraction {self.val_fraction}); use a shorter seq_len or more data")
        self.window_ends = np.cumsum(windows)

    def sample_batch(self, rng, batch_size):
        """(batch_size, seq_len + 1) int64 windows at uniformly random positions, drawn with `rng`."""
        k = rng.integers(0, self.window_ends[-1], size=batch_size)
        seg = np.searchsorted(self.window_ends, k, side="right")
        starts = k - np.r_[0, self.window_ends][seg]  # offset inside segment `seg`
        T1 = self.seq_len + 1
        return np.stack([self.segments[s][1][o:o + T1] for s, o in zip(seg, starts)]).astype(np.int64)

    def iter_batches(self, batch_size, max_batches=None):
        """Deterministic non-overlapping windows in file order, for evaluation: yields (b, seq_len + 1) int64."""
        rows, T, n = [], self.seq_len, 0
        for _, ids in self.segments:
            for o in range(0, len(ids) - T, T):
                rows.append(ids[o:o + T + 1])
                if len(rows) == batch_size:
                    yield np.stack(rows).astype(np.int64)
                    rows, n = [], n + 1
                    if max_batches is not None and n >= max_batches:
                        return
        if rows:
            yield np.stack(rows).astype(np.int64)

    def __len__(self):
        return self.n_tokens

    def __repr__(self):
        return (f"TokenDataset({len(self.paths)} shards, split={self.split!r}, tokens={self.n_tokens}, "
                f"seq_len={self.seq_len}, vocab_size={self.vocab_size})")


def rng_state(rng):
    """JSON-serialisable state of a np.random.Generator (its bit generator's state dict)."""
    return rng.bit_generator.state


BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM, "MT19937": np.random.MT19937,
                  "Philox": np.random.Philox, "SFC64": np.random.SFC64}  # what a saved state may name


def rng_from_state(state, where="rng state"):
    """A new np.random.Generator that continues exactly where the one `state` was taken from stood. The bit
    generator is looked up in an allow-list (a checkpoint never picks which numpy function runs); a state
    that numpy refuses is a FormatError naming `where`."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in BIT_GENERATORS:
        raise FormatError(f"{where}: bit_generator must be one of {', '.join(BIT_GENERATORS)}, got {name!r}")
    bit_gen = BIT_GENERATORS[name]()
    try:
        bit_gen.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise FormatError(f"{where}: not a valid {name} state ({type(e).__name__}: {e})") from None
    return np.random.Generator(bit_gen)
