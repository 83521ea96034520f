"""The kubetune command line: what pods and people run, and its exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.cli import build_parser, exit_code_for, main
from kubetune_trainer.exit_codes import ConfigError, ExitCode, PreemptedError, UnsupportedHardwareError
from kubetune_trainer.quickstart import make_task_records


def _kubetune(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def test_parser_lists_the_commands() -> None:
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"make-tiny-model", "train", "run", "sweep", "quickstart"} <= set(choices)


def test_exit_code_mapping() -> None:
    from pydantic import BaseModel, ValidationError

    from kubetune_trainer.data import DataError

    class M(BaseModel):
        x: int

    try:
        M(x="no")  # type: ignore[arg-type]
    except ValidationError as exc:
        assert exit_code_for(exc) == ExitCode.BAD_CONFIG
    assert exit_code_for(ConfigError("x")) == 2
    assert exit_code_for(DataError("f.jsonl", "bad", "fix it", line=3)) == 3
    assert exit_code_for(UnsupportedHardwareError("x")) == 4
    assert exit_code_for(PreemptedError("x")) == 143
    assert exit_code_for(RuntimeError("boom")) == 1
    assert ExitCode.PREEMPTED.retryable and ExitCode.UNEXPECTED.retryable and not ExitCode.BAD_DATA.retryable


def test_bad_config_exits_2_without_a_traceback(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model_name: m\ntrain_file: t.jsonl\nlerning_rate: 0.1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'learning_rate'" in err and str(cfg) in err
    assert "Traceback" not in err


def test_run_local_trains_from_a_config_with_relative_paths(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = make_task_records(40, seed=3)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (tmp_path / "data" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "model_name": str(tiny_model_dir),
                "train_file": "data/train.jsonl",  # relative to the YAML file
                "validation_file": "data/val.jsonl",
                "output_dir": "out",
                "max_steps": 3,
                "per_device_train_batch_size": 8,
                "metrics": ["perplexity", "exact_match"],
                "eval_max_examples": 4,
                "progress_bar": False,
            }
        )
    )
    res = _kubetune("run", str(job), "--local", cwd=Path("/"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"eval_loss", "eval_perplexity", "eval_exact_match"} <= set(metrics["eval"])
    assert f"done: output in {out}" in res.stdout


def test_bad_data_exits_3_naming_file_line_and_field(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 7}\n')
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {"model_name": str(tiny_model_dir), "train_file": str(data), "output_dir": str(tmp_path / "o")}
        )
    )
    res = _kubetune("train", "--config", str(job))
    assert res.returncode == 3, res.stderr[-3000:]
    assert f"{data}, line 2, field 'output'" in res.stderr
    assert "Traceback" not in res.stderr


def test_run_requires_local_flag(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(["run", str(tmp_path / "job.yaml")])
    assert err.value.code == 2
    assert "--local" in capsys.readouterr().err
