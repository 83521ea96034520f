"""Repeated train() calls (the guide's continual-learning and grid-search loops) and init_adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from kubetune_trainer import FinetuningConfig, ModelFinetuner
from kubetune_trainer.data.replay import replay_count
from kubetune_trainer.exit_codes import ConfigError
from kubetune_trainer.job import run_training
from kubetune_trainer.quickstart import make_task_records

STEPS = 4


@pytest.fixture(scope="module")
def tasks() -> list[list[dict[str, str]]]:
    """Three disjoint slices of the code-word task (distinct inputs), 32 records each."""
    rows = make_task_records(96, seed=3)
    return [rows[:32], rows[32:64], rows[64:]]


def _config(model: Path, out: Path, train: list[dict], **kw) -> FinetuningConfig:
    train_file = out.parent / f"{out.name}-train.jsonl"
    train_file.parent.mkdir(parents=True, exist_ok=True)
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    base = {
        "model_name": str(model),
        "output_dir": str(out),
        "train_file": str(train_file),
        "method": "lora",
        "max_steps": STEPS,
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "progress_bar": False,
        "seed": 0,
        "precision": "fp32",
    }
    return FinetuningConfig(**{**base, **kw})


def _first_loss(ft: ModelFinetuner) -> float:
    return next(e["loss"] for e in ft.trainer.state.log_history if "loss" in e)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))


def test_continual_loop_continues_the_model_and_saves_each_task(
    tiny_model_dir: Path, tasks, tmp_path: Path
) -> None:
    out = tmp_path / "continual"
    ft = ModelFinetuner(_config(tiny_model_dir, out, tasks[0], resume="auto"))
    ft.train()
    after_task1 = {k: v.clone() for k, v in get_peft_model_state_dict(ft.model).items()}
    seen = list(tasks[0])
    for n, task in enumerate(tasks[1:], start=2):
        ft.train(task, replay_buffer=seen)
        seen += task
        run_dir = out / f"task-{n}"
        assert ft.run_dir == run_dir
        # The task's adapter is saved in its own directory, with its own checkpoints: nothing
        # was resumed from the previous task (whose last step is also STEPS).
        assert (run_dir / "adapter_config.json").is_file()
        assert _steps(run_dir) == [f"checkpoint-{STEPS}"]
        assert ft.trainer.state.global_step == STEPS
        assert next(e["step"] for e in ft.trainer.state.log_history if "loss" in e) == 1
        # Replay without replay_fraction mixes in the default share (the API's 0.1).
        assert ft.data.stats.replay_examples == replay_count(len(task), 0.1)
        provenance = json.loads((run_dir / "provenance.json").read_text())
        assert provenance["continued_from"] == str(out if n == 2 else out / f"task-{n - 1}")
    # The first task's adapter was saved to output_dir when the second task started.
    saved1 = _adapter(out)
    assert saved1.keys() == after_task1.keys()
    assert all(torch.equal(saved1[k], after_task1[k]) for k in saved1)
    assert not torch.equal(_adapter(out / "task-2")[next(iter(saved1))], saved1[next(iter(saved1))])

    # Task 2 started from task 1's adapter: training it from that adapter (init_adapter) in a new
    # finetuner gives the same first-step loss, and a fresh adapter a different one.
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(r) + "\n" for r in tasks[0]), encoding="utf-8")
    looped = ModelFinetuner(_config(tiny_model_dir, tmp_path / "loop2", tasks[0]))
    looped.train()
    looped.train(tasks[1], replay_buffer=str(replay))
    cont = ModelFinetuner(
        _config(tiny_model_dir, tmp_path / "from-adapter", tasks[1], init_adapter=str(tmp_path / "loop2"))
    )
    cont.train(replay_buffer=str(replay))
    fresh = ModelFinetuner(_config(tiny_model_dir, tmp_path / "fresh", tasks[1]))
    fresh.train(replay_buffer=str(replay))
    assert _first_loss(cont) == pytest.approx(_first_loss(looped), rel=1e-5)
    assert _first_loss(looped) < _first_loss(fresh) - 0.05


def test_grid_loop_runs_are_independent(tiny_model_dir: Path, tasks, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    config = _config(tiny_model_dir, out, tasks[0], resume="auto")
    ft = ModelFinetuner(config)
    results = []
    for lr in (3e-3, 1e-2):
        for bs in (8, 4):
            config.learning_rate = lr
            config.per_device_train_batch_size = bs
            ft.train()
            results.append((ft.run_dir, _first_loss(ft), ft.trainer.state.log_history))
    dirs = [r[0] for r in results]
    assert dirs == [out, out / "run-2", out / "run-3", out / "run-4"]
    for run_dir, _, history in results:
        # Each run trained its own STEPS steps from step 1: no checkpoint of another run resumed.
        assert _steps(run_dir) == [f"checkpoint-{STEPS}"]
        assert next(e["step"] for e in history if "loss" in e) == 1
        assert (run_dir / "adapter_model.safetensors").is_file()
    # Each run starts from the base model: its first-step loss is a fresh run's with its settings.
    fresh = ModelFinetuner(
        _config(
            tiny_model_dir, tmp_path / "fresh", tasks[0], learning_rate=1e-2, per_device_train_batch_size=4
        )
    )
    fresh.train()
    assert results[3][1] == pytest.approx(_first_loss(fresh), rel=1e-5)
    assert results[2][1] == pytest.approx(results[0][1], rel=1e-5)  # batch 8, either learning rate
    # ... and it ends where a fresh run with those settings ends.
    fresh.save_model()
    fresh_weights, run4 = _adapter(tmp_path / "fresh"), _adapter(out / "run-4")
    assert all(torch.allclose(fresh_weights[k], run4[k], atol=1e-6) for k in run4)


def test_init_adapter_starts_from_the_saved_weights_and_trains_on(
    tiny_model_dir: Path, tasks, tmp_path: Path
) -> None:
    first = ModelFinetuner(_config(tiny_model_dir, tmp_path / "first", tasks[0]))
    first.train()
    saved_dir = first.save_model()
    saved = _adapter(saved_dir)

    ft = ModelFinetuner(_config(tiny_model_dir, tmp_path / "second", tasks[1], init_adapter=str(saved_dir)))
    ft.load_model()
    start = get_peft_model_state_dict(ft.model)
    assert start.keys() == saved.keys()
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    trainable = [n for n, p in ft.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ft.train()
    end = get_peft_model_state_dict(ft.model)
    assert any(not torch.equal(end[k], saved[k]) for k in saved)  # it trained on
    assert json.loads((ft.save_model() / "provenance.json").read_text())["continued_from"] == str(saved_dir)


def test_init_adapter_must_match_method_and_base(tiny_model_dir: Path, tasks, tmp_path: Path) -> None:
    first = ModelFinetuner(_config(tiny_model_dir, tmp_path / "first", tasks[0], max_steps=1))
    first.train()
    adapter = first.save_model()

    prefix = ModelFinetuner(
        _config(tiny_model_dir, tmp_path / "p", tasks[0], method="prefix", init_adapter=str(adapter))
    )
    with pytest.raises(ConfigError, match=r"is a LORA adapter, but method is 'prefix'.*set method to 'lora'"):
        prefix.load_model()

    from kubetune_trainer.tiny_model import make_tiny_model

    other = make_tiny_model(tmp_path / "wider", hidden_size=96)
    wrong_base = ModelFinetuner(_config(other, tmp_path / "w", tasks[0], init_adapter=str(adapter)))
    with pytest.raises(ConfigError, match=r"different base model: hidden_size 64 \(base model: 96\)"):
        wrong_base.load_model()

    with pytest.raises(ConfigError, match=r"no adapter_config\.json"):
        ModelFinetuner(
            _config(tiny_model_dir, tmp_path / "x", tasks[0], init_adapter=str(tmp_path))
        ).load_model()
    with pytest.raises(ValueError, match=r"method\.type full trains no adapter"):
        _config(tiny_model_dir, tmp_path / "f", tasks[0], method="full", init_adapter=str(adapter))


def test_replay_settings_are_checked_not_replaced(tiny_model_dir: Path, tasks, tmp_path: Path) -> None:
    cfg = _config(tiny_model_dir, tmp_path / "r0", tasks[1], replay_fraction=0.0)
    with pytest.raises(ConfigError, match="replay_fraction is 0: set replay_fraction above 0"):
        ModelFinetuner(cfg).train(replay_buffer=tasks[0])
    with pytest.raises(ConfigError, match="ewc_lambda > 0 needs replay_file"):
        ModelFinetuner(_config(tiny_model_dir, tmp_path / "e", tasks[1], ewc_lambda=1.0)).train()
    # A job file (no replay_buffer possible) with a fraction and no replay file says so.
    with pytest.raises(ConfigError, match="replay_fraction > 0 needs replay_file"):
        run_training(_config(tiny_model_dir, tmp_path / "j", tasks[1], replay_fraction=0.3))
    # EWC across the loop: the Fisher is estimated on the replay buffer for the second task.
    ft = ModelFinetuner(_config(tiny_model_dir, tmp_path / "ewc", tasks[0], max_steps=2))
    ft.train()
    ft.config.ewc_lambda = 100.0
    ft.config.ewc_samples = 4
    ft.train(tasks[1], replay_buffer=tasks[0])
    assert ft.run_dir == tmp_path / "ewc" / "task-2" and ft.trainer.ewc is not None
