"""``ModelFinetuner``: the guide's API over transformers' Trainer and PEFT.

    ft = ModelFinetuner(FinetuningConfig(model_name="./tiny-model", train_file="train.jsonl", use_lora=True))
    ft.load_model(); ft.train(); print(ft.evaluate()); ft.save_model()
    ft.load_finetuned_model("./finetuned_model"); print(ft.generate("Hello", max_new_tokens=20))

The whole job as pods run it (``kubetune train --config``) is ``kubetune_trainer.job.run_training``.

Repeated ``train()`` calls (the guide's loops) each write a run directory of their own:

- ``train(task_data, replay_buffer=old)`` again with unchanged hyperparameters continues the
  model trained so far (continual learning) in ``<output_dir>/task-<n>/``;
- ``train()`` after a hyperparameter in ``config`` changed (grid search, see ``RUN_FIELDS``)
  starts from the base model again in ``<output_dir>/run-<n>/``.

The first call uses ``<output_dir>`` itself; ``n`` counts the calls (2, 3, ...). Each run's
adapter is saved in its directory (the first one when the second starts, unless save_model()
saved it already), and each has its own ``checkpoints/`` (and ``<storage root>/task-<n>/``
prefix), so a run never resumes another run's checkpoints.

Output directory layout (the same under ``<storage root>/final/``)::

    adapter_config.json, adapter_model.safetensors   PEFT adapter (full fine-tuning: model files)
    tokenizer files, chat_template.jinja              the tokenizer used in training
    provenance.json                                   base model, data hashes, config, metrics
    metrics.json                                      final evaluation / test metrics
    log_history.json, training_curves.png             the Trainer's logs and their plot (kubetune plot)
    tensorboard/                                      TensorBoard event files (report_to: [tensorboard])
    merged/                                           base + adapter merged (merge_adapter: true)
    checkpoints/checkpoint-<step>/                    Trainer checkpoints (not uploaded as final)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_trainer.artifacts import (
    METRICS_FILE,
    check_saved_adapter,
    save_merged,
    upload_output,
    write_curves,
    write_provenance,
)
from kubetune_trainer.config import FinetuningConfig
from kubetune_trainer.distributed import DistInfo, dist_info, init_distributed, local_main_first
from kubetune_trainer.exit_codes import ConfigError, PreemptedError
from kubetune_trainer.methods import (
    apply_method,
    check_supported,
    model_load_kwargs,
    parameter_counts,
    resolve_packing,
    resolve_precision,
    torch_dtype,
)
from kubetune_trainer.models import load_tokenizer, resolve_model_path
from kubetune_trainer.tracking import TrackingRun, check_report_to, run_name

if TYPE_CHECKING:  # the data package imports tokenizers; loaded when first used
    from kubetune_trainer.data import DataInput, DataSource
    from kubetune_trainer.data.options import Dedupe
    from kubetune_trainer.settings import DataFormat

log = logging.getLogger(__name__)

# Config fields that define a run: when one of them changed between two train() calls (the
# guide's grid search sets config.learning_rate = lr), the next run starts from the base model.
# The others (data, replay, EWC, evaluation, reporting, output_dir) may change from one task of
# a continual sequence to the next.
RUN_FIELDS = (
    "model_name", "model_revision", "trust_remote_code", "attn_implementation", "init_adapter",
    "method", "lora", "quantization", "virtual_tokens", "max_seq_length", "packing",
    "group_by_length", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "learning_rate", "warmup_ratio", "warmup_steps",
    "lr_scheduler_type", "weight_decay", "max_grad_norm", "optim", "precision", "seed",
    "gradient_checkpointing", "deepspeed",
)  # fmt: skip


class ModelFinetuner:
    """Fine-tune a causal LM with LoRA, QLoRA, full fine-tuning, prefix, prompt or P-tuning."""

    def __init__(self, config: FinetuningConfig | dict[str, Any]):
        self.config = config if isinstance(config, FinetuningConfig) else FinetuningConfig.from_dict(config)
        self.dist: DistInfo = dist_info()
        self.model: Any = None
        self.tokenizer: Any = None
        self.trainer: Any = None
        self.data: Any = None  # kubetune_trainer.data.PreparedData of the last train()
        self.base_model_path: str | None = None
        self.precision: str | None = None
        self.train_metrics: dict[str, Any] = {}
        self.eval_metrics: dict[str, Any] = {}
        self.test_metrics: dict[str, Any] = {}
        self.preempted = False
        self._callbacks: dict[str, Any] = {}
        self._deepspeed_args: Any = None  # keeps HfDeepSpeedConfig alive for ZeRO-3 loading
        self._adapter_loaded_from: str | None = None
        self.merged_dir: Path | None = None  # set when save_model() wrote a merged model
        self._replay: DataSource | None = None  # the replay source of the last prepare_data()
        # Repeated train() calls (module docstring): how many started, the RUN_FIELDS of the
        # last one, its directory, and whether its output was saved there.
        self.runs = 0
        self._run_fields: dict[str, Any] | None = None
        self.run_dir: Path | None = None
        self._run_saved = False
        self._run_prefix = ""  # the run's prefix under the storage root ("" for the first run)
        self.continued_from: str | None = None  # what the current run's model started from
        self._tracking: Any = None  # kubetune_trainer.tracking.TrackingRun of the last train()

    # ------------------------------------------------------------------------- loading

    def load_model(self) -> Any:
        """Load tokenizer and base model and wrap it for the configured method."""
        from transformers import AutoModelForCausalLM, set_seed

        cfg = self.config
        check_supported(cfg)  # before any download: QLoRA without a GPU fails here (exit 4)
        check_metric_requirements(cfg)  # ... and a metric whose package is missing (exit 2)
        check_report_to(cfg)  # ... and an experiment tracker whose package is missing (exit 2)
        self.precision = precision = resolve_precision(cfg)
        init_distributed(use_deepspeed=cfg.deepspeed is not None)
        if cfg.deepspeed is not None and cfg.deepspeed.zero_stage == 3:
            # TrainingArguments with a ZeRO-3 config must exist before from_pretrained so the
            # weights are partitioned while loading (transformers' HfDeepSpeedConfig hook).
            self._deepspeed_args = self._training_args()
        # Seeded before the model exists: adapter weights (LoRA A, prompt embeddings) are drawn
        # when the method wraps the model, before Trainer seeds anything.
        set_seed(cfg.seed)
        self.base_model_path = resolve_model_path(cfg.model_name, self.dist)
        self.tokenizer = load_tokenizer(self.base_model_path, cfg)
        batches = "packed" if resolve_packing(cfg) else "padded"
        log.info(
            "loading %s (%s, precision %s, %s batches%s)",
            self.base_model_path,
            cfg.method,
            self.precision,
            batches,
            "" if cfg.packing is not None else " by packing: auto",
        )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.base_model_path,
                **model_load_kwargs(cfg, precision),
            )
        except OSError as exc:
            raise ConfigError(
                f"model_name {cfg.model_name!r}: cannot load a causal language model from it ({exc}); "
                "give a directory with config.json and weights (e.g. from `kubetune make-tiny-model DIR`)"
            ) from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if cfg.init_adapter:
            from kubetune_trainer.init_adapter import continue_adapter

            self.model = continue_adapter(cfg, model, self.dist)
            self.continued_from = cfg.init_adapter
        else:
            self.model = apply_method(cfg, model)
            self.continued_from = None
        trainable, total = parameter_counts(self.model)
        log.info("trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))
        return self.model

    def load_finetuned_model(self, path: str | os.PathLike[str]) -> Any:
        """Load a saved output (adapter + tokenizer, or a full model) for generate()/evaluate()."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise ConfigError(f"{p} is not a directory: pass the output_dir of a finished training")
        precision = resolve_precision(self.config)
        dtype = torch_dtype(precision)
        if (p / "adapter_config.json").is_file():
            from peft import PeftConfig, PeftModel

            peft_config = PeftConfig.from_pretrained(str(p))
            base = self._base_for_adapter(peft_config.base_model_name_or_path)
            model = AutoModelForCausalLM.from_pretrained(
                base, dtype=dtype, trust_remote_code=self.config.trust_remote_code
            )
            self.model = PeftModel.from_pretrained(model, str(p), is_trainable=False)
            self.base_model_path = base
        elif (p / "config.json").is_file():
            self.model = AutoModelForCausalLM.from_pretrained(
                str(p), dtype=dtype, trust_remote_code=self.config.trust_remote_code
            )
        else:
            raise ConfigError(f"{p} holds neither adapter_config.json nor config.json: not a saved model")
        tok_dir = p if (p / "tokenizer_config.json").is_file() else Path(self.base_model_path or p)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        import torch

        if torch.cuda.is_available():
            self.model.to("cuda")
        self.model.eval()
        self.trainer = None
        self._adapter_loaded_from = str(p)
        return self.model

    def _base_for_adapter(self, recorded: str | None) -> str:
        """The base model for an adapter: the config's model when loaded, else the recorded one."""
        if self.base_model_path:
            return self.base_model_path
        if self.config.model_name:
            return resolve_model_path(self.config.model_name, self.dist)
        if recorded:
            return recorded
        raise ConfigError("the adapter does not record its base model: set model_name")

    # ------------------------------------------------------------------------- data

    def prepare_data(self, train_data: DataInput = None, replay_buffer: DataInput = None) -> Any:
        """Read, check and tokenise the data (DataError names file, line and field on bad data)."""
        from kubetune_trainer.data import (
            DataOptions,
            DataSource,
            augmentation_synonyms_file,
            local_augmentation,
            local_source,
            materialise,
            prepare_datasets,
        )

        cfg = self.config
        self._require_model()
        scratch = self._out() / ".data"
        if train_data is not None:
            train = [DataSource(materialise(train_data, scratch, "train"), cfg.data_format)]
        else:
            train = [DataSource(m.path, m.format, m.weight) for m in cfg.mixture]
            if cfg.train_file:
                train.insert(0, DataSource(cfg.train_file, cfg.data_format))
        replay_path = (
            materialise(replay_buffer, scratch, "replay") if replay_buffer is not None else cfg.replay_file
        )
        if replay_path and cfg.replay_fraction == 0:
            raise ConfigError(
                "replay data is given (replay_file or train(..., replay_buffer=...)) but replay_fraction is 0: "
                "set replay_fraction above 0 (the default is 0.1) or leave the replay data out"
            )
        replay_fraction = cfg.replay_fraction if replay_path else 0.0
        with local_main_first(self.dist):
            # s3:// data files are downloaded once per node (local rank 0), then read by every rank.
            sources = [local_source(s.path, scratch, self.dist, s.format, s.weight) for s in train]
            val = local_source(
                cfg.validation_file, scratch, self.dist, cfg.validation_format or cfg.data_format
            )
            test = local_source(cfg.test_file, scratch, self.dist, cfg.test_format or cfg.data_format)
            replay = local_source(replay_path, scratch, self.dist)
            synonyms_file = augmentation_synonyms_file(cfg, scratch, self.dist)
        options = DataOptions(
            max_seq_length=cfg.max_seq_length,
            dedupe=cfg.dedupe,
            validation_split=cfg.validation_split,
            seed=cfg.seed,
            replay_fraction=replay_fraction,
            drop_too_long=cfg.drop_too_long,
            augmentation=local_augmentation(cfg, synonyms_file, self.dist),
        )
        self.data = prepare_datasets(
            self.tokenizer,
            [s for s in sources if s is not None],
            options,
            validation=val,
            test=test,
            replay=replay,
        )
        self._replay = replay
        return self.data

    # ------------------------------------------------------------------------- training

    def _out(self) -> Path:
        """The current run's directory (``output_dir`` until a second train() call)."""
        return self.run_dir if self.run_dir is not None else Path(self.config.output_dir)

    def _training_args(self, **extra: Any) -> Any:
        from kubetune_trainer.training import training_arguments

        assert self.precision is not None
        return training_arguments(
            self.config, self.precision, disable_tqdm=self._progress_reporter_available(), **extra
        )

    def _progress_reporter_available(self) -> bool:
        try:
            import kubetune_trainer.callbacks
            import kubetune_trainer.progress  # noqa: F401
        except ImportError:
            return False
        return True

    def train(self, train_data: DataInput = None, replay_buffer: DataInput = None) -> dict[str, Any]:
        """Train; ``train_data``/``replay_buffer`` (a file or a list of records) override the config's.

        Called again, it continues the model trained so far (``task-<n>/``), or, when a
        hyperparameter changed in ``config`` since the last call, trains a fresh base model
        (``run-<n>/``): see the module docstring. Resumes from the newest complete checkpoint
        of this run's directory when ``resume`` is ``auto``. Returns the Trainer's training
        metrics. Raises PreemptedError (exit 143) when stopped by SIGTERM after saving a checkpoint.
        """
        from transformers import EarlyStoppingCallback, PrinterCallback

        from kubetune_trainer.data import make_collator
        from kubetune_trainer.fast_paths import padding_mask_droppable, skip_input_casts_under_autocast
        from kubetune_trainer.fused_lora import fuse_lora_layers
        from kubetune_trainer.fused_mlp import fuse_swiglu_mlps
        from kubetune_trainer.fused_norm import fuse_rms_norms
        from kubetune_trainer.fused_rotary import fuse_rotary
        from kubetune_trainer.training import CHECKPOINTS_SUBDIR, KubetuneTrainer, LogMetricsCallback

        cfg = self.config
        if cfg.ewc_lambda > 0 and replay_buffer is None and not cfg.replay_file:
            raise ConfigError(
                "ewc_lambda > 0 needs replay_file (or train(..., replay_buffer=...)): the Fisher information "
                "is estimated on the earlier tasks' data"
            )
        self._start_run()
        if self.model is None:
            self.load_model()
        data = self.prepare_data(train_data, replay_buffer)
        self._check_metrics_fit_data(data)

        args = self._training_args(output_dir=str(self._out() / CHECKPOINTS_SUBDIR))
        callbacks: list[Any] = []
        if cfg.early_stopping is not None:
            callbacks.append(
                EarlyStoppingCallback(
                    early_stopping_patience=cfg.early_stopping.patience,
                    early_stopping_threshold=cfg.early_stopping.threshold,
                )
            )
        try:
            callbacks += self._runtime_callbacks()
            if not cfg.progress_bar or "reporter" not in self._callbacks:
                callbacks.append(LogMetricsCallback())
            ewc = self._estimate_ewc() if cfg.ewc_lambda > 0 else None
            if self._tracking is not None:  # a new train() is a new tracker run
                self._tracking.end()
            self._tracking = TrackingRun(cfg, self.dist.is_global_rank0).start()

            skip_input_casts_under_autocast(self.model)
            if not (cfg.deepspeed is not None and cfg.deepspeed.zero_stage == 3):
                fuse_lora_layers(self.model)  # ZeRO-3 gathers weights only when a layer itself runs
            fuse_rms_norms(self.model)
            fuse_swiglu_mlps(self.model)
            fuse_rotary(self.model)
            packing = resolve_packing(cfg)
            self.trainer = KubetuneTrainer(
                model=self.model,
                args=args,
                train_dataset=data.train,
                eval_dataset=data.validation,
                data_collator=make_collator(self.tokenizer, packing),
                processing_class=self.tokenizer,
                callbacks=callbacks,
                eval_hook=self._eval_hook,
                ewc=ewc,
                drop_padding_mask=not packing
                and padding_mask_droppable(self.model, cfg.method, cfg.trust_remote_code),
            )
            # Progress goes to the reporter's bar or LogMetricsCallback's log lines, not raw dicts on stdout.
            self.trainer.remove_callback(PrinterCallback)
            resume = self._resume_checkpoint()
            result = self.trainer.train(resume_from_checkpoint=resume)
        finally:
            # The SIGTERM handler only means something while the Trainer runs: a notebook or
            # script that trains and goes on must stop on SIGTERM again, close() or not.
            self._restore_signal_handlers()
        self.model = self.trainer.model
        self.train_metrics = dict(result.metrics)
        pre = self._callbacks.get("preemption")
        if pre is not None and _flag(pre):
            self.preempted = True
            raise PreemptedError(
                f"stopped by SIGTERM at step {self.trainer.state.global_step} after saving a checkpoint; "
                "the next attempt resumes from it"
            )
        if self.runs > 1:  # a run of a sequence keeps its adapter (the first: when the next starts)
            self.save_model(self._out())
        return self.train_metrics

    def _start_run(self) -> None:
        """Pick this train() call's directory and starting model (see the module docstring)."""
        cfg = self.config
        fields = cfg.model_dump(include=set(RUN_FIELDS))
        previous, self._run_fields = self._run_fields, fields
        self.runs += 1
        if self.runs == 1:
            self.run_dir = Path(cfg.output_dir)
            self._run_saved = False
            return
        previous_dir = self.run_dir
        if not self._run_saved and previous_dir is not None and self.model is not None:
            log.info("saving the previous run's output to %s before the next run", previous_dir)
            self.save_model(previous_dir)
        self.close()  # the previous run's progress reporter and signal handlers
        changed = [k for k in RUN_FIELDS if previous is not None and previous.get(k) != fields[k]]
        kind = "run" if changed else "task"
        self._run_prefix = f"{kind}-{self.runs}/"
        self._callbacks.pop("store", None)
        self.run_dir = Path(cfg.output_dir) / f"{kind}-{self.runs}"
        self._run_saved = False
        if changed:
            log.info(
                "%s changed since the last train(): run %d starts from the base model in %s",
                ", ".join(changed),
                self.runs,
                self.run_dir,
            )
            self.model = self.trainer = self.data = None
        else:
            self.continued_from = str(previous_dir)
            log.info("task %d continues the model trained so far, in %s", self.runs, self.run_dir)

    def _require_model(self) -> None:
        if self.model is None or self.tokenizer is None:
            raise RuntimeError("no model loaded: call load_model() or load_finetuned_model(path) first")

    def _check_metrics_fit_data(self, data: Any) -> None:
        check_metric_requirements(self.config)
        gen = self.config.generation_metrics
        if not gen or data.validation is None:
            return
        examples = data.eval_examples("validation")
        if not any(ex.get("prompt_ids") and ex.get("prompt") for ex in examples):
            raise ConfigError(
                f"metrics {gen} compare generated answers with references, but the validation data is plain "
                "text (no prompt/response); use instruction, chat or completion data, or only 'perplexity'"
            )

    def _estimate_ewc(self) -> Any:
        from kubetune_trainer.data import DataOptions, prepare_datasets
        from kubetune_trainer.ewc import EWCPenalty

        cfg = self.config
        assert self._replay is not None  # ewc_lambda > 0 requires replay_file (config check)
        replay = prepare_datasets(
            self.tokenizer,
            [self._replay],
            DataOptions(max_seq_length=cfg.max_seq_length, dedupe=cfg.dedupe, seed=cfg.seed),
        ).train
        import torch

        if torch.cuda.is_available():
            self.model.to(f"cuda:{self.dist.local_rank}")
        examples = [replay[i] for i in range(min(cfg.ewc_samples, len(replay)))]
        return EWCPenalty.estimate(self.model, examples, cfg.ewc_lambda)

    def _runtime_callbacks(self) -> list[Any]:
        """Progress reporting, preemption handling and S3 checkpoints (callbacks.runtime_callbacks)."""
        cfg = self.config
        try:
            from kubetune_trainer.callbacks import runtime_callbacks
        except ImportError:
            if cfg.storage_uri:
                raise ConfigError(
                    "storage_uri is set but this installation has no storage support (kubetune_trainer.callbacks)"
                ) from None
            return []
        return runtime_callbacks(cfg, self.dist, self._store(), self._out() / "checkpoints", self._callbacks)

    def _store(self) -> Any:
        root = self.config.storage_root()
        if root is None:
            return None
        if "store" not in self._callbacks:
            from kubetune_trainer.storage import CheckpointStore

            self._callbacks["store"] = CheckpointStore(
                root + self._run_prefix, run_id=os.environ.get("KUBETUNE_ATTEMPT")
            )
        return self._callbacks["store"]

    def _resume_checkpoint(self) -> str | None:
        """The checkpoint this run resumes from (see storage/resume.py); None with ``resume: never``."""
        from kubetune_trainer.storage.resume import resume_checkpoint

        cfg = self.config
        if cfg.resume == "never":
            return None
        return resume_checkpoint(
            self._store(), self._out() / "checkpoints", self.dist, deepspeed=cfg.deepspeed is not None
        )

    def _eval_hook(self, trainer: Any, prefix: str) -> dict[str, Any]:
        """Generation metrics for Trainer's evaluation loop (runs on every rank)."""
        cfg = self.config
        names = cfg.generation_metrics
        if not names or self.data is None:
            return {}
        split = "test" if prefix.startswith("test") else "validation"
        try:
            examples = self.data.eval_examples(split)
        except ValueError:
            return {}
        from kubetune_trainer.evaluation.generation import generation_metrics

        model = trainer.accelerator.unwrap_model(trainer.model)
        zero3 = cfg.deepspeed is not None and cfg.deepspeed.zero_stage == 3 and self.dist.distributed
        values, predictions = generation_metrics(
            model,
            self.tokenizer,
            examples[: cfg.eval_max_examples],
            names,
            cfg.eval_max_new_tokens,
            batch_size=cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size,
            synced_gpus=zero3,
            semantic_model=cfg.semantic_model,
        )
        self.last_predictions = predictions
        return values

    # ------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, Any]:
        """Metrics on the validation data: eval_loss, perplexity and the configured metrics.

        Works after train(), and before it (a baseline after load_model()) or on a saved model
        (after load_finetuned_model()) when the config has validation_file or validation_split.
        The validation set is built by the same pipeline as train()'s, so the numbers compare.
        """
        self._require_model()
        if self.trainer is not None and self.trainer.eval_dataset is not None:
            metrics = self.trainer.evaluate()
            self.eval_metrics = _clean(metrics, self.trainer.last_extra_metrics, "eval")
            return self.eval_metrics
        cfg = self.config
        if self.trainer is None and cfg.validation_file:
            # Read, checked, tokenised and deduplicated as train() reads its validation_file.
            view: Any = _TestView(
                self._prepare_eval_file(
                    None, cfg.validation_file, cfg.validation_format or cfg.data_format, cfg.dedupe
                )
            )
            dataset = view.dataset
        elif self.trainer is None and cfg.validation_split is not None:
            # Held out from the training files exactly as train() holds it out (same seed, same hash).
            view = self.prepare_data()
            dataset = view.validation
        else:
            raise ConfigError("no validation data: set validation_file or validation_split")
        self.eval_metrics = self._evaluate_on(view, dataset, "eval")
        return self.eval_metrics

    def test(self, data: DataInput = None) -> dict[str, Any]:
        """Metrics on held-out data (a file or a list of records; default: test_file).

        Works on any loaded model: the base (load_model()), a trained one, or a saved one.
        """
        self._require_model()
        cfg = self.config
        if data is None and not cfg.test_file:
            raise ConfigError("no test data: pass test(data) or set test_file")
        view = _TestView(self._prepare_eval_file(data, cfg.test_file, cfg.test_format or cfg.data_format))
        self.test_metrics = self._evaluate_on(view, view.dataset, "test")
        return self.test_metrics

    def _prepare_eval_file(
        self, data: DataInput, configured: str | None, data_format: DataFormat, dedupe: Dedupe = "none"
    ) -> Any:
        """One evaluation file (or list of records) through the training data pipeline."""
        from kubetune_trainer.data import DataOptions, DataSource, local_source, materialise, prepare_datasets

        cfg = self.config
        scratch = self._out() / ".data"
        if data is not None:
            source = DataSource(materialise(data, scratch, "test"), data_format)
        else:
            with local_main_first(self.dist):  # s3:// data: one download per node
                local = local_source(configured, scratch, self.dist, data_format)
            assert local is not None  # the caller checked that a file is configured
            source = local
        # The file goes in as "train" of its own PreparedData; _TestView presents it to the eval hook.
        return prepare_datasets(
            self.tokenizer,
            [source],
            DataOptions(
                max_seq_length=cfg.max_seq_length,
                dedupe=dedupe,
                seed=cfg.seed,
                drop_too_long=cfg.drop_too_long,
            ),
        )

    def _evaluate_on(self, data: Any, dataset: Any, prefix: str) -> dict[str, Any]:
        """Evaluate ``dataset``; the eval hook reads generation examples from ``data``."""
        from transformers import PrinterCallback

        from kubetune_trainer.data import make_collator
        from kubetune_trainer.training import KubetuneTrainer

        cfg = self.config
        previous = self.data
        self.data = data
        try:
            trainer = self.trainer
            if trainer is None:
                if self.precision is None:
                    self.precision = resolve_precision(cfg)
                trainer = KubetuneTrainer(
                    model=self.model,
                    # Evaluation only: no schedule, no checkpoints.
                    args=self._training_args(
                        eval_strategy="no", save_strategy="no", load_best_model_at_end=False, report_to="none"
                    ),
                    data_collator=make_collator(self.tokenizer, resolve_packing(cfg)),
                    processing_class=self.tokenizer,
                    eval_hook=self._eval_hook,
                )
                trainer.remove_callback(PrinterCallback)  # the metrics are returned; no raw dict on stdout
            metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
            return _clean(metrics, trainer.last_extra_metrics, prefix)
        finally:
            # A validation split prepared for a baseline stays (train() prepares its own anyway).
            self.data = previous if isinstance(data, _TestView) else data

    def score(self, prompt: str, reference: str) -> tuple[float, int]:
        """(sum of token NLLs, number of tokens) of ``reference`` after ``prompt`` — for perplexity."""
        import torch

        self._require_model()
        tok = self.tokenizer
        prompt_ids = tok(prompt).input_ids
        ref_ids = tok(reference, add_special_tokens=False).input_ids
        if not ref_ids:
            return 0.0, 0
        ids = torch.tensor([prompt_ids + ref_ids], device=_device(self.model))
        labels = ids.clone()
        labels[0, : len(prompt_ids)] = -100
        with torch.no_grad():
            loss = self.model(input_ids=ids, labels=labels).loss
        return float(loss) * len(ref_ids), len(ref_ids)

    # ------------------------------------------------------------------------- generation

    def generate(
        self,
        prompt: str | dict[str, Any] | list[dict[str, str]],
        max_new_tokens: int = 100,
        temperature: float = 0.7,
        do_sample: bool | None = None,
        **generate_kwargs: Any,
    ) -> str:
        """Generate text after ``prompt``.

        ``prompt`` is raw text (encoded as is), a record of the training data formats
        (instruction / completion / chat: encoded with the training template), or a list of
        chat messages. ``temperature`` 0 means greedy decoding.
        """
        import torch

        from kubetune_trainer.data import encode_prompt

        self._require_model()
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = tok(prompt).input_ids
        elif isinstance(prompt, list):
            ids = encode_prompt(tok, {"messages": prompt}, "chat")
        elif isinstance(prompt, dict):
            ids = encode_prompt(tok, prompt)
        else:
            raise TypeError(
                f"prompt must be a string, a data record or a list of messages, not {type(prompt).__name__}"
            )
        sample = temperature > 0 if do_sample is None else do_sample
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": sample,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            "eos_token_id": tok.eos_token_id,
        }
        if sample:
            kwargs["temperature"] = temperature
        kwargs.update(generate_kwargs)
        device = _device(self.model)
        input_ids = torch.tensor([ids], device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
                )
        finally:
            self.model.train(was_training)
        return tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)

    # ------------------------------------------------------------------------- saving

    def save_model(self, output_dir: str | os.PathLike[str] | None = None) -> Path:
        """Save the adapter (or full model), tokenizer and provenance.json; optionally a merged model.

        Every rank must call this under DeepSpeed ZeRO-3 (the weights are gathered across
        ranks); files are written by global rank 0.
        """
        self._require_model()
        out = Path(output_dir) if output_dir is not None else self._out()
        if out.resolve() == self._out().resolve():
            self._run_saved = True
        if self.trainer is not None:
            self.trainer.save_model(str(out))  # ZeRO-aware: gathers sharded weights
        elif self.dist.is_global_rank0:
            self.model.save_pretrained(str(out))
        if self.dist.is_global_rank0:
            from kubetune_trainer.data import chat_template_for

            tok = self.tokenizer
            # Serving must render conversations exactly like training, fallback template included.
            tok.chat_template = chat_template_for(tok)
            tok.save_pretrained(str(out))
            check_saved_adapter(out, self.model)
            self._write_provenance(out)
            self._write_curves(out)
            if self.config.merge_adapter and self.config.uses_peft:
                self._save_merged(out)
        self._barrier()
        return out

    def _write_curves(self, out: Path) -> None:
        """log_history.json and training_curves.png next to the adapter (uploaded with it)."""
        if self.trainer is None or not self.trainer.state.log_history:
            return
        title = f"{run_name(self.config)} ({self.config.method})"
        png = write_curves(out, self.trainer.state.log_history, title)
        if png is not None and self._tracking is not None:
            self._tracking.log_artifact(png)

    def _save_merged(self, out: Path) -> None:
        merged = save_merged(out, self.config, str(self.base_model_path), self.precision, self.tokenizer)
        if merged is not None:
            self.merged_dir = merged

    def _write_provenance(self, out: Path) -> None:
        write_provenance(
            out,
            self.config,
            self.model,
            base_model_path=self.base_model_path,
            continued_from=self.continued_from,
            run={"index": self.runs, "directory": str(self._out())},
            data=self.data,
            metrics={"train": self.train_metrics, "eval": self.eval_metrics, "test": self.test_metrics},
            global_step=self.trainer.state.global_step if self.trainer is not None else None,
        )

    def write_metrics(self, out: Path | None = None) -> dict[str, Any]:
        doc = {"train": self.train_metrics, "eval": self.eval_metrics, "test": self.test_metrics}
        if self.dist.is_global_rank0:
            target = Path(out or self._out()) / METRICS_FILE
            target.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        return doc

    def upload_final(self) -> str | None:
        """Upload the output (not the checkpoints) to ``<storage root>/final/`` and metrics.json."""
        store = self._store()
        if store is None or not self.dist.is_global_rank0:
            return None
        uri = upload_output(
            store,
            self._out(),
            {"train": self.train_metrics, "eval": self.eval_metrics, "test": self.test_metrics},
        )
        reporter = self._callbacks.get("reporter")
        if reporter is not None and hasattr(reporter, "output"):
            reporter.output(uri)
        return uri

    def close(self, status: str = "FINISHED") -> None:
        """End the tracker run (``status``: FINISHED, FAILED or KILLED), stop the progress reporter
        (metrics server, status patches) and restore signal handlers."""
        if self._tracking is not None:
            self._tracking.end("KILLED" if self.preempted else status)
            self._tracking = None
        reporter = self._callbacks.pop("reporter", None)
        if reporter is not None:
            reporter.close()
        self._restore_signal_handlers()
        self._callbacks.pop("preemption", None)

    def _restore_signal_handlers(self) -> None:
        pre = self._callbacks.get("preemption")
        if pre is not None and hasattr(pre, "restore_signal_handlers"):
            pre.restore_signal_handlers()  # idempotent

    def _barrier(self) -> None:
        if self.dist.distributed:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.barrier()


# ----------------------------------------------------------------------------- helpers


class _TestView:
    """Presents a PreparedData whose train split is evaluation data (test or validation file),
    for the evaluation hook, which asks for the split by name."""

    def __init__(self, prepared: Any):
        self._prepared = prepared
        self.dataset = prepared.train
        self.fingerprints = prepared.fingerprints

    def eval_examples(self, split: str = "test") -> list[dict[str, Any]]:
        return self._prepared.eval_examples("train")


def check_metric_requirements(config: FinetuningConfig) -> None:
    """Fail before any work when a configured metric cannot be computed here.

    ``semantic_similarity`` needs the optional sentence-transformers package, which the
    operator's config validation cannot see (the config itself requires ``semantic_model``).
    """
    from kubetune_trainer.evaluation.metrics import check_semantic_similarity

    if "semantic_similarity" not in config.metrics or not config.semantic_model:
        return
    try:
        check_semantic_similarity(config.semantic_model)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"{exc} (semantic_model: {config.semantic_model!r}; the kubetune trainer image has the package)"
        ) from exc
    model = config.semantic_model
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise ConfigError(
            f"semantic_model {model!r}: directory not found; give a sentence-transformers model "
            "directory or a model name"
        )


def _clean(metrics: dict[str, Any], extra: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Trainer metrics without the prefix noise, plus non-scalar extras (confusion matrix)."""
    out = {
        k: v
        for k, v in metrics.items()
        if not k.endswith(("_runtime", "_samples_per_second", "_steps_per_second"))
    }
    for k, v in extra.items():
        out.setdefault(f"{prefix}_{k}", v)
    return out


def _flag(callback: Any) -> bool:
    for attr in ("preempted", "triggered", "received"):
        value = getattr(callback, attr, None)
        if isinstance(value, bool):
            return value
    return False


def _device(model: Any) -> Any:
    return next(model.parameters()).device
