"""The callbacks inside a real transformers Trainer (tiny random Llama, CPU) with a real SeaweedFS:
upload + prune on save, resume from S3, SIGTERM preemption, progress and tokens/s."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from kubetune_trainer.callbacks import (
    PREEMPTED_EXIT_CODE,
    PreemptionCallback,
    ProgressCallback,
    S3CheckpointCallback,
    window_rate,
)
from kubetune_trainer.progress import ProgressReporter
from kubetune_trainer.storage import CheckpointStore, RetryPolicy, s3_client_from_env

SEQ, BATCH = 16, 2


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def make_trainer(
    out: Path, callbacks: list[TrainerCallback], max_steps: int, save_steps: int, **kw
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **kw,
    )
    return Trainer(
        model=tiny_model(),
        args=args,
        train_dataset=RandomTokens(),
        eval_dataset=RandomTokens(8),
        callbacks=callbacks,
    )


@pytest.fixture
def store(s3, s3_bucket: str) -> CheckpointStore:
    return CheckpointStore(
        f"s3://{s3_bucket}/kubetune/ns/job/uid/",
        client=s3_client_from_env(env=s3.env()),
        retry=RetryPolicy(attempts=3, base_delay_s=0.1),
    )


class StepRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.s3
def test_saves_are_uploaded_pruned_and_resumable(store: CheckpointStore, tmp_path: Path) -> None:
    reporter = ProgressReporter(metrics_port=0, metrics_addr="127.0.0.1", show_bar=False)
    upload = S3CheckpointCallback(
        store, str(tmp_path / "run1"), keep_last=2, node_rank=0, is_global_rank0=True, reporter=reporter
    )
    make_trainer(tmp_path / "run1", [upload], max_steps=6, save_steps=2).train()

    assert upload.uploaded_steps == [2, 4, 6] and upload.failed_steps == []
    assert store.list_steps() == [4, 6]  # keep_last=2 pruned step 2
    assert store.latest_complete() == 6
    manifest = store.read_manifest(6)
    assert manifest is not None
    names = {f.path for f in manifest.files}
    assert {
        "model.safetensors",
        "trainer_state.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
    } <= names
    assert reporter.checkpoint_state is not None
    assert (reporter.checkpoint_state.step, reporter.checkpoint_state.count) == (6, 2)
    assert reporter.checkpoint_state.latest == str(store.checkpoint_uri(6))
    assert reporter.metrics is not None
    assert reporter.metrics.checkpoints_uploaded._value.get() == 3
    reporter.close()

    # A new pod: empty disk, resume from S3.
    step, path = store.restore_latest(tmp_path / "run2") or (None, None)
    assert step == 6 and path == tmp_path / "run2" / "checkpoint-6"
    recorder = StepRecorder()
    upload2 = S3CheckpointCallback(
        store, str(tmp_path / "run2"), keep_last=2, node_rank=0, is_global_rank0=True
    )
    trainer = make_trainer(tmp_path / "run2", [upload2, recorder], max_steps=8, save_steps=2)
    trainer.train(resume_from_checkpoint=str(path))
    assert recorder.steps == [7, 8]  # continued, did not start over
    assert upload2.uploaded_steps == [8]
    assert store.list_steps() == [6, 8]


class SendSigterm(TrainerCallback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the step


@pytest.mark.s3
def test_sigterm_saves_uploads_and_stops(store: CheckpointStore, tmp_path: Path) -> None:
    preemption = PreemptionCallback()
    try:
        upload = S3CheckpointCallback(
            store, str(tmp_path / "run"), keep_last=3, node_rank=0, is_global_rank0=True
        )
        trainer = make_trainer(
            tmp_path / "run", [preemption, upload, SendSigterm(at_step=3)], max_steps=50, save_steps=1000
        )
        trainer.train()
    finally:
        preemption.restore_signal_handlers()
    assert preemption.preempted and preemption.received_signal == signal.SIGTERM
    assert preemption.exit_code == PREEMPTED_EXIT_CODE == 143
    assert trainer.state.global_step == 3
    assert store.latest_complete() == 3
    restored = store.download(3, tmp_path / "restore")
    assert json.loads((restored / "trainer_state.json").read_text())["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("trainer_counts", [False, True])
def test_progress_callback_reports_losses_lr_and_tokens(tmp_path: Path, trainer_counts: bool) -> None:
    reporter = ProgressReporter(show_bar=False)
    progress = ProgressCallback(reporter, sample_every_s=0.0)
    trainer = make_trainer(
        tmp_path,
        [progress],
        max_steps=4,
        save_steps=1000,
        eval_strategy="steps",
        eval_steps=2,
        include_num_input_tokens_seen=trainer_counts,
    )
    trainer.train()
    reporter.close()

    s = reporter.state
    assert (s.step, s.total_steps) == (4, 4)
    assert s.train_loss is not None and 2.0 < s.train_loss < 6.0  # ~ln(64) for a random model
    assert s.eval_loss is not None and s.learning_rate is not None
    assert s.tokens_per_second is not None and s.tokens_per_second > 0
    # Eval batches are not training tokens: 4 steps x 2 x 16 exactly.
    if trainer_counts:
        assert trainer.state.num_input_tokens_seen == 4 * BATCH * SEQ
        assert progress.local_tokens_counted == 0
    else:
        assert progress.local_tokens_counted == 4 * BATCH * SEQ


def test_window_rate() -> None:
    assert window_rate([]) is None
    assert window_rate([(0.0, 0.0)]) is None
    assert window_rate([(1.0, 100.0), (2.0, 150.0), (3.0, 400.0)]) == 150.0
    assert window_rate([(1.0, 100.0), (1.0, 200.0)]) is None


def test_callback_arguments_are_checked(store: CheckpointStore) -> None:
    with pytest.raises(ValueError, match="keepLast"):
        S3CheckpointCallback(store, "out", keep_last=0, node_rank=0, is_global_rank0=True)
    with pytest.raises(ValueError, match="node 0"):
        S3CheckpointCallback(store, "out", keep_last=1, node_rank=1, is_global_rank0=True)
