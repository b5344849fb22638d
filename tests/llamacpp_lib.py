"""llama.cpp's own C libraries for the tests, through ctypes: ggml's reference quantizers and dequantizers
(libggml-base), llama-quantize's whole-file quantization (libllama's llama_model_quantize) and its repetition
penalty sampler, from the
node-llama-cpp binaries `tests/llamacpp.py` installs (skipped, saying why, where those cannot be had)."""
import ctypes
import functools
import os

import numpy as np

from tests.llamacpp import node_llama_cpp

BLOCK_BYTES = {"q2_K": 84, "q3_K": 110, "q4_K": 144, "q5_K": 176, "q6_K": 210,  # bytes of 256 values
               "q4_0": 144, "q5_0": 176, "q5_1": 192, "q8_0": 272}
FTYPES = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16,
          "q5_k_m": 17, "q6_k": 18}  # include/llama.h's llama_ftype


def bins() -> str:
    """The directory of llama.cpp's CPU libraries (libggml-base.so, libllama.v0.5.0.so, ...)."""
    return os.path.join(os.path.dirname(node_llama_cpp()), "@node-llama-cpp", "linux-x64", "bins", "linux-x64")


@functools.cache
def libggml_base():
    return ctypes.CDLL(os.path.join(bins(), "libggml-base.so"))


def ggml_quantize(x, kind: str) -> np.ndarray:
    """ggml's quantize_row_{kind}_ref ("q4_K", "q5_K", "q6_K") on float32 x, flattened -> its bytes."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    out = np.zeros(x.size // 256 * BLOCK_BYTES[kind], np.uint8)
    getattr(libggml_base(), f"quantize_row_{kind}_ref")(x.ctypes.data_as(ctypes.c_void_p),
                                                         out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out


def ggml_dequantize(q, kind: str) -> np.ndarray:
    """ggml's dequantize_row_{kind} on blocks q -> float32 values, flattened."""
    q = np.ascontiguousarray(q, np.uint8).reshape(-1)
    out = np.zeros(q.size // BLOCK_BYTES[kind] * 256, np.float32)
    getattr(libggml_base(), f"dequantize_row_{kind}")(q.ctypes.data_as(ctypes.c_void_p),
                                                       out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(out.size))
    return out


class QuantizeParams(ctypes.Structure):
    """include/llama.h's llama_model_quantize_params (llama.cpp of node-llama-cpp 3.22.1)."""
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int), ("output_tensor_type", ctypes.c_int),
                ("token_embedding_type", ctypes.c_int), ("allow_requantize", ctypes.c_bool),
                ("quantize_output_tensor", ctypes.c_bool), ("only_copy", ctypes.c_bool), ("pure", ctypes.c_bool),
                ("keep_split", ctypes.c_bool), ("dry_run", ctypes.c_bool), ("imatrix", ctypes.c_void_p),
                ("kv_overrides", ctypes.c_void_p), ("tt_overrides", ctypes.c_void_p),
                ("prune_layers", ctypes.c_void_p), ("max_buf_size", ctypes.c_size_t)]


@functools.cache
def libllama():
    lib = ctypes.CDLL(os.path.join(bins(), "libllama.v0.5.0.so"))  # finds libggml*.so beside it (RUNPATH $ORIGIN)
    lib.llama_model_quantize_default_params.restype = QuantizeParams
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(QuantizeParams)]
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_backend_init()
    return lib


def llama_quantize(src, dst, file_type: str, threads: int = 1) -> None:
    """llama-quantize src dst FILE_TYPE (no importance matrix): llama.cpp's own whole-file quantization."""
    params = libllama().llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[file_type], threads
    assert libllama().llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params)) == 0


class TokenData(ctypes.Structure):
    """include/llama.h's llama_token_data."""
    _fields_ = [("id", ctypes.c_int32), ("logit", ctypes.c_float), ("p", ctypes.c_float)]


class TokenDataArray(ctypes.Structure):
    """include/llama.h's llama_token_data_array."""
    _fields_ = [("data", ctypes.POINTER(TokenData)), ("size", ctypes.c_size_t), ("selected", ctypes.c_int64),
                ("sorted", ctypes.c_bool)]


def llamacpp_penalized(logits, context, last_n: int, penalty: float) -> np.ndarray:
    """float32 logits after llama.cpp's penalties sampler (llama_sampler_init_penalties: repeat penalty over the
    last `last_n` accepted ids, no frequency or presence penalty) has accepted the ids of `context`."""
    lib = libllama()
    lib.llama_sampler_init_penalties.restype = ctypes.c_void_p
    lib.llama_sampler_init_penalties.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_float, ctypes.c_float,
                                                 ctypes.c_float]
    lib.llama_sampler_accept.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.llama_sampler_apply.argtypes = [ctypes.c_void_p, ctypes.POINTER(TokenDataArray)]
    lib.llama_sampler_free.argtypes = [ctypes.c_void_p]
    sampler = lib.llama_sampler_init_penalties(len(logits), last_n, penalty, 0.0, 0.0)
    for token in context:
        lib.llama_sampler_accept(sampler, int(token))
    data = (TokenData * len(logits))(*[(i, float(x), 0.0) for i, x in enumerate(logits)])
    lib.llama_sampler_apply(sampler, ctypes.byref(TokenDataArray(data, len(logits), -1, False)))
    lib.llama_sampler_free(sampler)
    return np.array([d.logit for d in data], np.float32)
