"""What the multi-process tests share: a small byte-level shard set and the settings of a tiny run."""
import pytest

from fusegrad.data.prepare import prepare

STEPS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    text = out / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}.\n" for i in range(400)))
    prepare([str(text)], str(out / "shards"), tokenizer="byte", val_fraction=0.1, overwrite=True)
    return str(out / "shards")


def run_config(data_dir, out_dir, **kw) -> dict:
    """TrainConfig settings of a tiny STEPS-step run checkpointing every 2 steps; kw override them."""
    return {**dict(preset="tiny", data=data_dir, max_steps=STEPS, warmup_steps=1, batch_size=4, seq_len=16,
                   out_dir=str(out_dir), progress=False, plot=False, sample_tokens=0, eval_interval=0,
                   ckpt_interval=2, quiet=True), **kw}
