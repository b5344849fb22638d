"""The settings layer: every value from the command line or a YAML file checked, refusals naming source,
key and value; --help lines with meaning, range and default."""
import dataclasses

import pytest

from fusegrad.cli.config import SETTINGS, config_from_args, help_line
from fusegrad.cli.main import build_parser, main
from fusegrad.core.errors import ConfigError
from fusegrad.core.settings import field_spec
from fusegrad.finetune.trainer import FinetuneConfig
from fusegrad.train.loop import RunConfig
from fusegrad.train.trainer import TrainConfig


def parse(argv):
    return config_from_args(TrainConfig, build_parser().parse_args(["train"] + argv))


@pytest.mark.parametrize("argv, match", [
    (["--lr", "0"], "command line: lr = 0.0 is outside"),
    (["--lr", "nan"], "lr = 'nan': expected a finite number"),
    (["--lr", "inf"], "expected a finite number"),
    (["--beta1", "1.5"], r"beta1 = 1.5 is outside \[0, 1\)"),
    (["--warmup_steps", "2.7"], "warmup_steps = '2.7': expected an integer"),
    (["--max_steps", "0"], "max_steps = 0 is outside"),
    (["--resume", "maybe"], "resume = 'maybe': expected true or false"),
    (["--top_p", "0"], "top_p = 0.0 is outside"),
    (["--lr", "1e-3", "--min_lr", "1e-2"], "min_lr = 0.01 is above lr = 0.001"),
])
def test_command_line_values_are_checked(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse(argv)


def test_min_lr_follows_lr_unless_given():
    assert parse(["--lr", "1e-4"]).lr_floor == pytest.approx(1e-5)  # was a cosine_schedule traceback
    assert parse(["--lr", "1e-4", "--min_lr", "0"]).lr_floor == 0.0
    assert TrainConfig().lr_floor == pytest.approx(3e-4)  # the old default
    assert FinetuneConfig(lr=1e-5).lr_floor == pytest.approx(1e-6)  # fine-tuning's floor follows its lr too
    assert FinetuneConfig(lr=1e-5, min_lr=1e-4).lr_floor == 1e-5  # a floor above lr is clamped, never a traceback


@pytest.mark.parametrize("text, match", [
    ("lr: null\n", "lr = null"),
    ("lr: [1, 2]\n", r"lr = \[1, 2\]: expected a number"),
    ("warmup_steps: 2.7\n", "warmup_steps = 2.7: expected an integer"),
    ("max_steps: true\n", "max_steps = True: expected an integer"),
    ("beta2: .nan\n", "expected a finite number"),
    ("batch_size: '16x'\n", "batch_size = '16x'"),
    ("learning_rate: 0.1\n", r"unknown setting\(s\) \['learning_rate'\]"),
    ("max_step: 10\n", "did you mean max_step -> max_steps"),
    ("- lr\n", "expected a mapping"),
    ("lr: [\n", "invalid YAML"),
    ("task: lm\n", r"unknown setting\(s\) \['task'\]"),
])
def test_yaml_values_are_checked_naming_file_and_key(tmp_path, text, match):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        parse(["--config", str(path)])
    assert "run.yaml" in str(info.value)


def test_yaml_types_convert_and_the_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nmax-steps: 7\nplot: no\ndim: null\nseq_len: 32\n")  # YAML reads 1e-4 as text
    cfg = parse(["--config", str(path), "--seq_len", "64"])
    assert (cfg.lr, cfg.max_steps, cfg.plot, cfg.dim, cfg.seq_len) == (1e-4, 7, False, None, 64)


def test_yaml_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"lr: 0.1\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="run.yaml: line 2 is not UTF-8"):
        parse(["--config", str(path)])


def test_the_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["train", "--lr", "-1", "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fusegrad train: error: command line: lr = -1.0 is outside (0, inf)"


@pytest.mark.parametrize("cls", [TrainConfig, FinetuneConfig])
def test_every_setting_has_help_and_the_help_shows_range_and_default(cls):
    for f in dataclasses.fields(cls):
        assert field_spec(cls, f.name, SETTINGS)[0], f"{cls.__name__}.{f.name} has no help text"
    lr = next(f for f in dataclasses.fields(cls) if f.name == "lr")
    assert help_line(cls, lr).startswith("peak learning rate") and "range (0, inf)" in help_line(cls, lr)
    assert f"default {lr.default!r}" in help_line(cls, lr)


def test_run_config_checks_itself_for_the_python_api():
    with pytest.raises(ConfigError, match="train: grad_accum = True: expected an integer"):
        RunConfig(grad_accum=True).check("train")
    with pytest.raises(ConfigError, match="finetune: batch_size = 0 is outside"):
        FinetuneConfig(batch_size=0).check("finetune")  # the base field's range holds for an overridden default
