"""PyTorch's checkpoint files (`torch.save`: pytorch_model.bin, *.pt) read without torch and without running them.

What older Hugging Face checkpoints publish: a zip archive holding `data.pkl`, the pickled state dict, and one
member per storage (`data/0`, `data/1`, ...), stored uncompressed. A pickle can name any Python callable, so this
unpickler knows only what a state dict of tensors needs (OrderedDict, torch's tensor rebuild, the float storage
types) and refuses anything else by name before it could run. Each tensor becomes an entry (dtype tag, shape,
absolute file offset) like a safetensors header's, read later by hf.read_tensor.

>>> import pickle, io
>>> _StateUnpickler(io.BytesIO(pickle.dumps(print)), {}, "x.bin").load()
Traceback (most recent call last):
...
fusegrad.core.errors.FormatError: x.bin: the pickle calls builtins.print; a state dict calls only torch's tensor rebuild
"""
from __future__ import annotations

import collections
import pickle
import struct
import zipfile
import zlib

import numpy as np

from fusegrad.core.errors import FormatError

_STORAGES = {"FloatStorage": ("F32", 4), "HalfStorage": ("F16", 2), "BFloat16Storage": ("BF16", 2)}
_OTHER_STORAGES = {"DoubleStorage": 8, "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
                   "ByteStorage": 1, "BoolStorage": 1}  # buffers (position ids, masks): listed, never loaded
_Storage = collections.namedtuple("_Storage", "tag itemsize key numel")
_Tensor = collections.namedtuple("_Tensor", "storage offset shape stride")


def is_legacy_torch(path) -> bool:
    """Saved in torch < 1.6's format: a pickle stream that starts with torch's magic number, not a zip."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x80\x02\x8a\x0a"  # PROTO 2, then LONG1 of 10 bytes (0x1950a86a20f9469cfc6c)
    except OSError:
        return False


def torch_pickle_entries(path) -> dict:
    """{name: (dtype tag, shape, absolute offset)} of every float tensor in a `torch.save`d state dict."""
    return read_torch_pickle(path)[0]


def read_torch_pickle(path) -> tuple:
    """({name: (dtype tag, shape, absolute offset)} of every float tensor, {name: value} of every plain value) of
    a `torch.save`d file; nested dicts give dotted names ("model.norm.weight", "model_args.dim")."""
    path = str(path)
    try:
        with open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise FormatError(f"{path}: a zip file, but not torch.save's (no single data.pkl member)")
            root = pkl[0][:-len("data.pkl")]
            if root + "byteorder" in names and zf.read(root + "byteorder").strip() != b"little":
                raise FormatError(f"{path}: tensors stored big-endian; fusegrad reads little-endian checkpoints")
            storages = {}
            state = _StateUnpickler(zf.open(pkl[0]), storages, path).load()
            offsets = {key: _member_offset(zf, raw, root + "data/" + key, path) for key in storages}
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError, struct.error, ValueError, zlib.error,
            TypeError, IndexError, KeyError, AttributeError, RecursionError, NotImplementedError, RuntimeError) as e:
        # NotImplementedError, RuntimeError: zipfile on a member of another zip version, method or encryption
        raise FormatError(f"{path}: not a readable torch.save checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path}: holds a pickled {type(state).__name__}, not a state dict of tensors")
    entries, values = {}, {}
    for name, t in _flatten(state):
        if not isinstance(t, _Tensor):
            values[name] = t
            continue
        shape, s = tuple(int(n) for n in t.shape), t.storage
        contiguous = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        numel = int(np.prod(shape, dtype=np.int64))
        if numel and tuple(t.stride) != contiguous:
            raise FormatError(f"{path}: tensor {name!r} is stored as a strided view (stride {tuple(t.stride)}); "
                              f"fusegrad reads contiguous tensors")
        start, length = offsets[s.key]
        if min(shape, default=0) < 0 or t.offset < 0 or (t.offset + numel) * s.itemsize > length \
                or (t.offset + numel) > s.numel:
            raise FormatError(f"{path}: tensor {name!r} {shape} at element {t.offset} lies outside its storage "
                              f"of {s.numel} elements")
        if s.tag is not None:
            entries[name] = (s.tag, shape, start + t.offset * s.itemsize)
    return entries, values


def _flatten(tree, prefix=""):
    """(dotted name, leaf) of nested dicts; a list or tuple is a leaf."""
    for key, value in tree.items():
        name = prefix + str(key)
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


class _StateUnpickler(pickle.Unpickler):
    """Rebuilds a state dict as _Tensor records; any other callable in the pickle is refused, never called."""

    def __init__(self, file, storages: dict, path: str):
        super().__init__(file)
        self.storages, self.path = storages, path

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad=False, hooks=None: data
        if module == "torch" and (name in _STORAGES or name in _OTHER_STORAGES):
            return name
        raise FormatError(f"{self.path}: the pickle calls {module}.{name}; a state dict calls only torch's tensor "
                          f"rebuild")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid  # ('storage', torch.FloatStorage, '0', 'cpu', n)
        if kind != "storage" or not isinstance(storage_type, str):
            raise FormatError(f"{self.path}: the pickle refers to {pid!r}, not a tensor storage")
        tag, itemsize = _STORAGES.get(storage_type, (None, _OTHER_STORAGES.get(storage_type, 1)))
        self.storages[str(key)] = storage = _Storage(tag, itemsize, str(key), int(numel))
        return storage


def _rebuild_tensor(storage, offset, shape, stride, *_):
    if not isinstance(storage, _Storage):
        raise ValueError(f"the pickle rebuilds a tensor from {storage!r}, not from a storage")
    return _Tensor(storage, int(offset), tuple(shape), tuple(stride))


def _member_offset(zf, raw, member, path):
    """(absolute offset, byte length) of an uncompressed zip member's data."""
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise FormatError(f"{path}: the state dict names storage {member!r}, which the archive lacks") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise FormatError(f"{path}: storage {member!r} is compressed; torch.save stores tensors uncompressed")
    raw.seek(info.header_offset)
    head = raw.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise FormatError(f"{path}: corrupt zip entry for {member!r}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size
