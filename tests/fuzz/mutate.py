"""Seeded mutations of a valid file and the verdict on what a loader did with each.

Every format is (name, make(dir) -> path of a valid file, load(path) -> result, check(result) -> None).
A case mutates the file (truncation, bit flips, byte runs, huge or negative integers, NaN floats, text
splices), loads it, and ends in one of: "ok" (loaded, and `check` found nothing out of range), "refused"
(a documented fusegrad error), or a failure: "crash" (any other exception: a traceback for the user) or
"accepted-bad" (loaded, but `check` found garbage). tests/fuzz/test_fuzz.py runs a few cases per format in
CI; scripts/fuzz.py runs many and prints the counts.
"""
import os
import re
import shutil
import struct
import time

import numpy as np

from fusegrad.core.errors import FusegradError

SPLICES = [b"NaN", b"-1", b"1e400", b"null", b"[]", b"{}", b'"x"', b"true", b"2.5", b"\xff\xfe", b"\x00",
           b"99999999999999999999", b"-9223372036854775809", b"\n", b"\"", b"}", b"]"]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random mutation of `data`."""
    data = bytearray(data)
    n = len(data)
    kind = rng.integers(0, 7)
    if kind == 0 and n:  # truncate
        return bytes(data[:rng.integers(0, n)])
    if kind == 1 and n:  # flip a few bits
        for _ in range(rng.integers(1, 9)):
            i = rng.integers(0, n)
            data[i] ^= 1 << rng.integers(0, 8)
        return bytes(data)
    if kind == 2 and n:  # overwrite a run with random bytes
        i = rng.integers(0, n)
        run = rng.integers(0, 256, size=min(n - i, int(rng.integers(1, 17))), dtype=np.uint8).tobytes()
        data[i:i + len(run)] = run
        return bytes(data)
    if kind == 3 and n >= 4:  # a huge, negative or NaN 4-byte value at an aligned offset
        i = int(rng.integers(0, n // 4)) * 4
        value = [struct.pack("<I", 0xFFFFFFFF), struct.pack("<i", -7), struct.pack("<f", float("nan")),
                 struct.pack("<I", 2_000_000_000), struct.pack("<f", float("inf"))][rng.integers(0, 5)]
        data[i:i + 4] = value
        return bytes(data)
    if kind == 4 and n >= 8:  # a huge 8-byte length (safetensors' header size, offsets)
        i = int(rng.integers(0, n // 8)) * 8
        data[i:i + 8] = struct.pack("<Q", int(rng.choice([2 ** 40, 2 ** 63 - 1, n * 2, 0])))
        return bytes(data)
    if kind == 5:  # splice a text token somewhere (wrong types in JSON/YAML, NaN, huge numbers)
        i = rng.integers(0, n + 1)
        j = min(n, i + int(rng.integers(0, 8)))
        data[i:j] = SPLICES[rng.integers(0, len(SPLICES))]
        return bytes(data)
    return bytes(data + data[: rng.integers(0, n + 1)])  # duplicate a tail


def run_format(fmt, workdir, cases: int, seed: int = 0, budget_s: float | None = None) -> dict:
    """Mutate `fmt`'s valid file `cases` times (or until `budget_s`) -> {outcome: count} and an example of each
    kind of failure."""
    name, make, load, check = fmt
    rng = np.random.default_rng(seed)
    base_dir = os.path.join(workdir, f"{name}-valid")
    os.makedirs(base_dir, exist_ok=True)
    valid_path = make(base_dir)
    valid = open(valid_path, "rb").read()
    counts, failures, kinds = {"ok": 0, "refused": 0, "crash": 0, "accepted-bad": 0}, [], set()
    start = time.perf_counter()
    for case in range(cases):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
        case_dir = os.path.join(workdir, f"{name}-{case}")
        shutil.copytree(base_dir, case_dir)
        path = os.path.join(case_dir, os.path.basename(valid_path))
        with open(path, "wb") as f:
            f.write(mutate(valid, rng))
        outcome, detail = verdict(load, check, path)
        counts[outcome] += 1
        kind = re.sub(r"[\d/]+|'[^']*'", "", detail or "")[:40]  # one example per kind of failure
        if outcome in ("crash", "accepted-bad") and kind not in kinds and len(kinds) < 8:
            kinds.add(kind)
            failures.append(f"{name} case {case}: {detail}")
        shutil.rmtree(case_dir, ignore_errors=True)
    return {"counts": counts, "failures": failures}


def verdict(load, check, path):
    try:
        result = load(path)
    except FusegradError:
        return "refused", None
    except Exception as e:  # noqa: BLE001 - any other exception is what the fuzz suite looks for
        return "crash", f"{type(e).__name__}: {e}"[:300]
    try:
        check(result)
    except AssertionError as e:
        return "accepted-bad", str(e)[:300]
    except FusegradError:
        return "refused", None  # refused on first use (e.g. a tokenizer that cannot encode): still clear
    except Exception as e:  # noqa: BLE001
        return "crash", f"on use: {type(e).__name__}: {e}"[:300]
    return "ok", None
