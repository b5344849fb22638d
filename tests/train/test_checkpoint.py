import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fusegrad import FormatError
from fusegrad.train.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_nested_state(tmp_path):
    state = {"params": {"a.w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.float32)},
             "optimizer": {"m": [np.ones(3), np.full(2, 7, np.int64)], "step": 12},
             "rng": {"bit_generator": "PCG64", "state": {"state": 2 ** 100 + 3, "inc": 5}}, "name": "x", "f": 1.5}
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    np.testing.assert_array_equal(back["params"]["a.w"], state["params"]["a.w"])
    assert back["params"]["a.w"].dtype == np.float32
    np.testing.assert_array_equal(back["optimizer"]["m"][1], state["optimizer"]["m"][1])
    assert back["optimizer"]["step"] == 12 and back["rng"] == state["rng"] and back["f"] == 1.5
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_not_a_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(FormatError, match="junk.safetensors"):
        load_checkpoint(bad)
    with pytest.raises(FormatError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_bad_key_is_rejected(tmp_path):
    with pytest.raises(FormatError, match="must be a str without '/'"):
        save_checkpoint(tmp_path / "c.safetensors", {"a/b": 1})


def test_kill_during_save_leaves_last_good_checkpoint(tmp_path):
    """SIGKILL a process in the middle of writing a large checkpoint: the old one still loads."""
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"params": {"w": np.full(4, 1.0, np.float32)}, "step": 1})
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from fusegrad.train.checkpoint import save_checkpoint
        print("ready", flush=True)
        while True:
            save_checkpoint({str(path)!r}, {{"params": {{"w": np.random.rand(8_000_000).astype(np.float32)}}, "step": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    import time
    time.sleep(0.8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(path)  # either the old or a complete new one, never a torn file
    assert state["step"] in (1, 2)
    assert state["params"]["w"].shape in ((4,), (8_000_000,))


def test_nothing_non_finite_is_written_or_read(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"params": {"w": np.ones(2, np.float32)}, "step": 1})
    with pytest.raises(FormatError, match="tensor params/w holds NaN or inf; not written"):
        save_checkpoint(path, {"params": {"w": np.array([1.0, np.nan], np.float32)}, "step": 2})
    assert load_checkpoint(path)["step"] == 1  # the good one is kept
    header = '{"params": {"w": {"__array__": "params/w"}}}'
    save_file({"params/w": np.array([np.inf], np.float32)}, str(path), metadata={"fusegrad": header})
    with pytest.raises(FormatError, match="c.safetensors: tensor params/w holds NaN or inf"):
        load_checkpoint(path)
    save_file({"w": np.ones(1, np.float32)}, str(path), metadata={"fusegrad": "[1, 2]"})
    with pytest.raises(FormatError, match="header is a list"):
        load_checkpoint(path)


def test_fields_are_read_checked_never_cast(tmp_path):
    from fusegrad.train.checkpoint import value, weights

    state = {"step": "7", "n": True, "params": {"w": np.ones((2, 2), np.int32), "v": np.ones(3, np.float32)}}
    with pytest.raises(FormatError, match="c: checkpoint field 'step' is a list, expected int"):
        value({"step": [1]}, "step", int, "c")
    assert value(state, "step", int, "c") == 7  # digits in a string read as the number they spell
    with pytest.raises(FormatError, match="n = True: expected an integer"):
        value(state, "n", int, "c")
    with pytest.raises(FormatError, match="'missing' is missing"):
        value(state, "missing", int, "c")
    with pytest.raises(FormatError, match=r"params/w is int32\[2, 2\], expected a float tensor"):
        weights(state, "params", {"w": (2, 2)}, "c")
    with pytest.raises(FormatError, match=r"params/v is float32\[3\], expected a float tensor of shape \[4\]"):
        weights(state, "params", {"v": (4,)}, "c")
    assert weights(state, "params", {"v": (3,)}, "c")["v"].dtype == np.float32
