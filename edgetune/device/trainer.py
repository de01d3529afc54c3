"""On-device training of a bundle's adapters on the installed onnxruntime.

Needs onnxruntime, numpy and tokenizers; never torch. How a step runs (sessions, gradients,
AdamW, checkpoint files) is ``edgetune.device.runner``'s business. The run directory::

    RUN/
      run.json                  manifest: bundle id, adapter config, status, final figures
      config.json               the resolved training config (keys sorted)
      checkpoints/latest        name of the newest complete checkpoint
      checkpoints/step-000100/  adapter + optimizer moments (safetensors) + trainer_state.json
      adapter/                  PEFT adapter (adapter_config.json, adapter_model.safetensors)
      metrics.jsonl, loss.png
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgetune.device import data as _data
from edgetune.device import dora as _dora
from edgetune.device import providers as devices
from edgetune.device import runner as _runner
from edgetune.device.tokenizer import ChatTokenizer
from edgetune.formats import atomic as _io
from edgetune.formats import bundle as _bundle
from edgetune.formats import lock as _lock
from edgetune.formats import peft_io
from edgetune.formats.config import TrainConfig
from edgetune.formats.errors import BundleError, ConfigError, DataError, TrainingError
from edgetune.formats.run import CHECKSUMS, TrainerState, latest_checkpoint

RUN_MANIFEST = "run.json"
KEEP_CHECKPOINTS = 2
Log = Callable[[str], None]


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant" or total <= cfg.warmup:
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.lr * (1.0 - frac)


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


@dataclass
class RunResult:
    out: Path
    steps: int
    final_loss: float | None
    valid_loss: float | None
    tokens_per_s: float
    adapter: Path
    summary: dict[str, Any]


def _trim_metrics(out: Path, step: int) -> None:
    """On resume: drop the metrics of steps after the checkpoint (that work is done again) and any
    line a kill cut short, so that metrics.jsonl holds each step once."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    kept, dropped = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            rec, dropped = None, True
        if rec is None:
            continue
        if isinstance(rec, dict) and int(rec.get("step") or 0) > step:
            dropped = True
            continue
        kept.append(line)
    if dropped:
        _io.write_text(path, "".join(k + "\n" for k in kept))


def _write_metric(out: Path, record: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


# Activation memory per (layer x token x hidden unit) of a training step, measured on the default
# model (peak RSS 2.1-2.2 GB at 1,024-token chunks, 30 layers, hidden 576, 0.5 GB of weights): ~75 B,
# rounded up for other shapes (wider MLPs, more heads per hidden unit).
ACTIVATION_BYTES = 96


def memory_estimate(b: _bundle.Bundle, cfg: TrainConfig) -> dict[str, float]:
    """Bytes a training run needs at its peak: the frozen weights (memory-mapped) and the
    activations of one chunk of ``max_batch_tokens`` (or one whole batch) tokens."""
    mc = b.manifest.get("model_config") or {}
    tokens = cfg.max_batch_tokens or cfg.batch_size * cfg.max_seq_len
    tokens = min(tokens, cfg.batch_size * cfg.max_seq_len)
    weights = sum(b.path(f).stat().st_size for f in ("train.onnx.data",) if b.path(f).is_file())
    layers, hidden = int(mc.get("num_hidden_layers") or 1), int(mc.get("hidden_size") or 1)
    if b.adapter.gradient_checkpointing:  # one layer's activations, plus each layer's inputs
        acts = (ACTIVATION_BYTES + 16 * layers) * hidden * tokens
    else:
        acts = ACTIVATION_BYTES * layers * hidden * tokens
    return {"weights": float(weights), "activations": float(acts), "total": 1.15 * (weights + acts) + 300 * 2**20}


def _available_bytes() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.split()[1:2]}
        return float(info.get("MemAvailable", 0) + info.get("SwapFree", 0)) or None
    except (OSError, ValueError, IndexError):
        return None


def check_memory(b: _bundle.Bundle, cfg: TrainConfig) -> None:
    """Refuse, before any work, a run this machine cannot hold, rather than be killed half-way."""
    if os.environ.get("EDGETUNE_SKIP_MEMORY_CHECK"):
        return
    avail = _available_bytes()
    est = memory_estimate(b, cfg)
    if avail is not None and est["total"] > avail:
        gb = 2**30
        raise TrainingError(
            f"training needs about {est['total'] / gb:.1f} GB (weights {est['weights'] / gb:.1f} GB, activations "
            f"{est['activations'] / gb:.1f} GB for chunks of {cfg.max_batch_tokens or cfg.batch_size * cfg.max_seq_len} "
            f"tokens); this machine has {avail / gb:.1f} GB available. Lower --max-batch-tokens or --batch-size, "
            "export with --quantize int4 or --gradient-checkpointing, or set EDGETUNE_SKIP_MEMORY_CHECK=1 to try anyway")


def _old_checkpoint(run: Path) -> bool:
    return any((d / "checkpoint").exists() for d in (run / "checkpoints").glob("step-*"))


class Trainer:
    """Trains the adapters of one bundle into one run directory."""

    def __init__(self, bundle: str | Path | _bundle.Bundle, out: str | Path, cfg: TrainConfig,
                 resume: bool = False, log: Log = print, progress: bool = True) -> None:
        self.bundle = bundle if isinstance(bundle, _bundle.Bundle) else _bundle.load(bundle)
        self.out = Path(out)
        self.cfg = cfg
        self.log = log
        self.progress = progress
        ctx = self.bundle.context
        if ctx and cfg.max_seq_len > ctx:
            log(f"--max-seq-len {cfg.max_seq_len} is longer than the bundle's context ({ctx} tokens); using {ctx}")
            cfg = dataclasses.replace(cfg, max_seq_len=ctx)
            self.cfg = cfg
        self.device = devices.resolve(cfg.device, devices.parse_options(cfg.provider_options))
        self.tok = ChatTokenizer.from_dir(self.bundle.root)
        self.state = TrainerState(bundle_id=self.bundle.base_id, adapter=self.bundle.manifest["adapter"])
        self._resume_from = self._check_out_dir(resume)
        self.runner: _runner.StepRunner | None = None
        self.task: str | None = cfg.task
        self.task_labels: list[str] | None = None
        self._task_model: Any = None
        self._packing: bool | None = None
        if cfg.packing == "on":
            _ = self.packing  # a bundle that cannot pack is refused before the run starts

    # -- setup -----------------------------------------------------------------
    def _check_out_dir(self, resume: bool) -> Path | None:
        exists = self.out.exists() and any(self.out.iterdir())
        if not resume:
            if exists:
                raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            return None
        if not exists:
            raise ConfigError(f"--resume: {self.out} holds no run to resume")
        _lock.check_free(self.out, "trained into")  # a run another process is writing is not read half-way
        skipped: list[str] = []
        ck = latest_checkpoint(self.out, skipped)
        if skipped:
            self.log(f"--resume: passed over damaged checkpoint(s): {'; '.join(skipped)}"
                     + (f"; resuming from {ck.name}" if ck else ""))
        if ck is None and _old_checkpoint(self.out):
            raise TrainingError(f"--resume: {self.out} was trained by an older edgetune (ONNX Runtime training "
                                f"checkpoints); continue from its adapter instead: edgetune import-peft "
                                f"{self.out}/adapter --bundle BUNDLE --out NEW_RUN, then train NEW_RUN with --resume")
        if ck is None and not skipped and self._same_run_started():
            self.log(f"--resume: {self.out} stopped before its first checkpoint; starting from step 0")
            _trim_metrics(self.out, 0)
            return None
        if ck is None:
            raise TrainingError(f"--resume: no intact checkpoint in {self.out}/checkpoints; train again from the start "
                                "into another --out")
        saved = _io.read_json(ck / "trainer_state.json", "checkpoint state")
        known = {f.name for f in dataclasses.fields(TrainerState)}
        if set(saved) - known:
            raise BundleError(f"{ck / 'trainer_state.json'} has unknown keys {sorted(set(saved) - known)}; "
                              "it was written by a newer edgetune")
        problems = []
        if saved.get("bundle_id") != self.bundle.base_id:
            problems.append(f"bundle id {self.bundle.base_id[:12]} differs from the run's {str(saved.get('bundle_id'))[:12]}")
        if saved.get("adapter") != self.bundle.manifest["adapter"]:
            problems.append(f"adapter config {self.bundle.manifest['adapter']} differs from the run's {saved.get('adapter')}")
        if problems:
            raise BundleError(f"--resume: bundle {self.bundle.root} does not match the checkpoint {ck}:\n  - "
                              + "\n  - ".join(problems))
        self.state = TrainerState(**saved)
        _trim_metrics(self.out, self.state.step)
        return ck

    def _same_run_started(self) -> bool:
        try:
            run = _io.read_json(self.out / RUN_MANIFEST, "the run manifest")
        except BundleError:
            return False
        return run.get("kind") == "edgetune-run" and run.get("bundle_id") == self.bundle.base_id

    def _open(self) -> None:
        if self.runner is not None:
            return
        check_memory(self.bundle, self.cfg)
        self.runner = _runner.StepRunner(self.bundle, self.device, self.cfg.threads, self.cfg.weight_decay)
        if self._resume_from is not None:
            self.runner.load(self._resume_from, self.state.step)
        self._setup_dora()

    def _setup_dora(self) -> None:
        """DoRA graphs take each layer's weight norm as an input (see edgetune.device.dora); the frozen
        base rows and their squared norms are read once."""
        self._dora = _dora.modules(self.bundle.trainable)
        if self._dora and not self.runner.has_norms_graph:
            self._dora_base = _dora.bundle_base_weights(self.bundle, self._dora)
            self._dora_wsq = {k: _dora.weight_sq(w) for k, w in self._dora_base.items()}

    def _extra_inputs(self) -> dict[str, np.ndarray]:
        """Inputs besides the batch: the DoRA norms of the adapter as it is now."""
        if not self._dora:
            return {}
        if self.runner.has_norms_graph:
            return self.runner.dora_norms()
        return _dora.norms_feed(self._dora, self._dora_base, self.runner.params, self.bundle.adapter.scale,
                                self._dora_wsq)

    # -- data ------------------------------------------------------------------
    def load_data(self, data: str | Path) -> tuple[_data.Dataset, _data.Dataset | None]:
        train_path = _data.resolve_split(data, "train")
        if train_path is None:
            raise DataError(f"{data} has no train.jsonl")
        train = _data.load_dataset(train_path, self.tok, self.cfg.max_seq_len, self.cfg.mask_prompt, self.cfg.truncate)
        vpath = _data.resolve_split(data, "valid")
        valid = (_data.load_dataset(vpath, self.tok, self.cfg.max_seq_len, self.cfg.mask_prompt, self.cfg.truncate)
                 if vpath else None)
        from edgetune.device import tasks

        self.task = self.cfg.task or tasks.read_task(data)
        if self.task == "classification":  # the label set is the training set's
            self.task_labels = sorted({ref for _, _, ref in tasks.load_records(Path(train.path))})
        return train, valid

    def task_metric(self, valid: _data.Dataset) -> dict[str, Any]:
        """The task's metric on the validation set with the adapter as it is now (infer graph)."""
        from edgetune.device import tasks
        from edgetune.device.infer import Model

        if self._task_model is None:
            self._task_model = Model.open(self.bundle.root, threads=self.cfg.threads)
        feed = {n: np.asarray(v, np.float32) for n, v in self.runner.params.items()}
        self._task_model.extra = {**feed, **_dora.feed_for_adapter(self.bundle, feed)}
        r = tasks.evaluate_task(self._task_model, Path(valid.path), self.task, self.task_labels, max_new_tokens=32)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def total_steps(self, train: _data.Dataset) -> tuple[int, int]:
        per_epoch = math.ceil(len(train) / self.cfg.batch_size)
        if self.cfg.steps:
            return self.cfg.steps, per_epoch
        epochs = self.cfg.epochs or 1.0
        return max(1, math.ceil(epochs * per_epoch / self.cfg.grad_accum)), per_epoch

    def schedule(self, total: int) -> dict[str, Any]:
        """The optimizer graph's learning-rate inputs for a run of ``total`` steps (see lr_at)."""
        from edgetune.device.batches import SCHEDULES

        return {"base_lr": self.cfg.lr, "warmup_steps": self.cfg.warmup, "total_steps": total,
                "schedule": SCHEDULES[self.cfg.schedule]}

    # -- steps -----------------------------------------------------------------
    def _micro_batches(self, train: _data.Dataset) -> Any:
        """Endless stream of (epoch, index, batch), starting at the saved position."""
        epoch, idx = self.state.epoch, self.state.batch_index
        while True:
            batches = _data.epoch_batches(train, self.cfg.batch_size, self.cfg.seed, epoch, self.tok.pad_id)
            while idx < len(batches):
                yield epoch, idx, batches[idx]
                idx += 1
            epoch, idx = epoch + 1, 0

    def _step(self, group: list[_data.Batch]) -> float:
        extra = self._extra_inputs()  # the weights change only at the optimizer step
        return sum(self.runner.accumulate({**feed, **extra}) for feed in self._chunk_feeds(group))

    def _chunk_feeds(self, group: list[_data.Batch]) -> list[dict[str, np.ndarray]]:
        """The training graph's data inputs for one optimizer step: its micro-batches in chunks of at
        most ``max_batch_tokens``, each chunk's summed loss divided by the step's labelled tokens."""
        norm = np.asarray(sum(b.n_labels for b in group), np.float32)
        packed = self.packing
        chunks = [c for b in group for c in _data.chunks(b, self.cfg.max_batch_tokens, packed)]
        return [_batch_feed(b, norm, {}) for b in chunks]

    @property
    def packing(self) -> bool:
        """Whether batches run packed (several records per row, see edgetune.device.data.pack):
        ``--packing auto`` packs where the bundle's graphs read segment ids and the fused attention
        runs (its memory is linear in the row's length; the plain graph's attention holds rows x
        heads x length^2 scores, which long packed rows would multiply)."""
        if self._packing is None:
            able = bool((self.bundle.manifest.get("packing") or {}).get("version") == 1)
            if self.cfg.packing == "off":
                self._packing = False
            elif self.cfg.packing == "on":
                if not able:
                    raise ConfigError(f"--packing on: bundle {self.bundle.root} was exported before sequence "
                                      "packing (its graphs read attention_mask as 0/1 only); export it again, "
                                      "or train with --packing auto or off")
                self._packing = True
            else:
                self._open()
                self._packing = able and self.runner.fused_attention
        return self._packing

    def planned_steps(self, train: _data.Dataset, steps: int) -> Any:
        """The data inputs of optimizer steps 1..``steps`` from the start of a run, as ``fit`` feeds
        them (for ``edgetune tokenize``): per step, the list of chunk feeds and the trainer state's
        data fields after it (``epoch``, ``batch_index``, ``tokens``, ``labelled``, cumulative)."""
        stream = self._micro_batches(train)
        tokens = labelled = 0
        for _ in range(steps):
            group, epoch, idx = [], 0, 0
            for _ in range(self.cfg.grad_accum):
                epoch, idx, b = next(stream)
                group.append(b)
            tokens += sum(b.n_tokens for b in group)
            labelled += sum(b.n_labels for b in group)
            yield self._chunk_feeds(group), {"epoch": epoch, "batch_index": idx + 1, "tokens": tokens,
                                             "labelled": labelled}

    def validate(self, valid: _data.Dataset) -> float:
        """Token-weighted mean loss over the validation set, with the eval graph."""
        batches = _data.epoch_batches(valid, self.cfg.batch_size, 0, 0, self.tok.pad_id)
        if self.cfg.valid_batches:
            batches = batches[: self.cfg.valid_batches]
        return self.validate_batches(batches)

    def validate_batches(self, batches: list[_data.Batch]) -> float:
        self._open()
        total, count = 0.0, 0
        extra = self._extra_inputs()
        one = np.asarray(1.0, np.float32)
        for b in (c for b in batches for c in _data.chunks(b, self.cfg.max_batch_tokens, self.packing)):
            total += self.runner.loss(_batch_feed(b, one, extra))
            count += b.n_labels
        return total / max(1, count)

    def adapter_tensors(self) -> dict[str, np.ndarray]:
        self._open()
        return {n: np.array(self.runner.params[n], copy=True) for n in self.bundle.trainable}

    def placement(self, train: _data.Dataset) -> dict[str, int]:
        """Nodes of the training graph each provider ran, from one profiled step on a batch."""
        self._open()
        b = _data.split_rows(_data.epoch_batches(train, self.cfg.batch_size, 0, 0, self.tok.pad_id)[0],
                             self.cfg.max_batch_tokens)[0]
        feed = {**_batch_feed(b, np.asarray(1.0, np.float32), self._extra_inputs()), **self.runner.params}
        return devices.placement(self.bundle.path("train.onnx"), self.device, feed)

    def set_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        """Start from ``tensors`` (graph names) instead of the bundle's initial adapter."""
        self._open()
        self.runner.set_params(tensors)

    # -- checkpoints -----------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically, then point ``latest`` at it."""
        name = f"step-{self.state.step:06d}"
        ck_root = self.out / "checkpoints"
        try:
            with _io.atomic_dir(ck_root / name) as tmp:
                self.runner.save(tmp)
                _fault("checkpoint-write")
                _io.write_json(tmp / "trainer_state.json", self.state.to_json())
                _io.write_json(tmp / CHECKSUMS, {f.name: _io.sha256_file(f) for f in sorted(tmp.iterdir())})
            _io.write_text(ck_root / "latest", name + "\n")
        except OSError as e:
            prev = latest_checkpoint(self.out)
            raise TrainingError(f"could not write checkpoint {name} ({e.strerror or e}); "
                                f"the previous checkpoint {prev.name if prev else '(none)'} is intact; "
                                "free some disk space and run again with --resume") from None
        for old in sorted(ck_root.glob("step-*"))[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return ck_root / name

    def save_adapter(self) -> Path:
        return peft_io.save(self.out / "adapter", self.adapter_tensors(), self.bundle.adapter,
                            base=str(self.bundle.manifest.get("source")),
                            metadata={"edgetune_base_id": self.bundle.base_id, "step": str(self.state.step)})

    # -- the loop ----------------------------------------------------------------
    def fit(self, train: _data.Dataset, valid: _data.Dataset | None = None) -> RunResult:
        total, per_epoch = self.total_steps(train)
        if self.state.step >= total:
            raise ConfigError(f"the run is already at step {self.state.step} of {total}; raise --steps to train further")
        self._open()  # before the run directory exists: a bundle that cannot load leaves nothing behind
        with _lock.hold(self.out, "trained into"):
            if not self._resume_from and self.out.exists() and any(self.out.iterdir()):
                raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            if self._resume_from is not None and latest_checkpoint(self.out) != self._resume_from:
                raise ConfigError(f"{self.out} changed while this run started (another process wrote a checkpoint); "
                                  "run the command again")
            created = not self.out.exists() or not any(self.out.iterdir())
            try:
                return self._fit(train, valid, total)
            except BaseException:
                # A run that stops before its first checkpoint has nothing to resume: leave no directory behind.
                if created and self.out.exists() and latest_checkpoint(self.out) is None:
                    shutil.rmtree(self.out, ignore_errors=True)
                raise

    def _log_int8_products(self) -> None:
        """A bundle with int8 products on a CPU whose int8 kernels are slower than float32: say so."""
        from edgetune.device import cpu

        q = self.bundle.manifest.get("quantization") or {}
        if q.get("compute") == "int8" and self.runner.providers()[:1] == ["CPUExecutionProvider"]:
            warning = cpu.int8_products_warning()
            if warning:
                self.log(f"int8 products: {warning}; a bundle exported with --compute float32 (the default) "
                         "trains faster on it")

    def _fit(self, train: _data.Dataset, valid: _data.Dataset | None, total: int) -> RunResult:
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_run_files(train, valid, total)
        self.log(f"training {len(self.bundle.trainable)} adapter tensors on {len(train)} examples "
                 f"({train.labelled} labelled of {train.tokens} tokens, {train.truncated} truncated); "
                 f"steps {self.state.step}->{total}; providers {', '.join(self.runner.providers())}; "
                 f"kernels {self.runner.kernel_info}; {'packed' if self.packing else 'padded'} rows")
        self._log_int8_products()
        self._log_truncation(train)
        stream = self._micro_batches(train)
        bar = _progress(total, self.state.step, self.progress)
        t_start = time.time() - self.state.elapsed
        window_t, window_tok = time.time(), 0
        try:
            while self.state.step < total:
                group = []
                for _ in range(self.cfg.grad_accum):
                    epoch, idx, b = next(stream)
                    group.append(b)
                lr = lr_at(self.state.step, self.cfg, total)
                _set_seed(self.cfg.seed * 1_000_003 + self.state.step)
                loss = self._step(group)
                if not math.isfinite(loss) or not self.runner.grads_finite():
                    self.runner.zero_grad()
                    self._nonfinite(loss)
                self.runner.step(lr, self.schedule(total))
                ntok = sum(b.n_tokens for b in group)
                self.state.step += 1
                self.state.epoch, self.state.batch_index = epoch, idx + 1
                self.state.tokens += ntok
                self.state.labelled += sum(b.n_labels for b in group)
                self.state.last_loss = loss
                self.state.elapsed = time.time() - t_start
                window_tok += ntok
                tps = window_tok / max(1e-9, time.time() - window_t)
                rec = {"step": self.state.step, "loss": round(loss, 6), "lr": lr, "tokens": self.state.tokens,
                       "tokens_per_s": round(tps, 1), "elapsed": round(self.state.elapsed, 2), "rss_mb": round(_rss_mb())}
                if valid is not None and self.cfg.eval_every and self.state.step % self.cfg.eval_every == 0:
                    t_val = time.time()
                    rec["valid_loss"] = self.state.last_valid_loss = round(self.validate(valid), 6)
                    if self.task:
                        rec["task_metrics"] = self.last_task_metrics = self.task_metric(valid)
                        self.log(f"step {self.state.step}: {self.task} " + _fmt_metrics(rec["task_metrics"]))
                    window_t += time.time() - t_val  # tokens/s counts training time only
                _write_metric(self.out, rec)
                _bar_update(bar, rec)
                if self.cfg.save_every and self.state.step % self.cfg.save_every == 0 and self.state.step < total:
                    self.save_checkpoint()
                _fault("step")
        finally:
            if bar is not None:
                bar.close()
        validated_last = bool(self.cfg.eval_every) and self.state.step % self.cfg.eval_every == 0
        if valid is not None and not validated_last:
            self.state.last_valid_loss = self.validate(valid)
            final: dict[str, Any] = {"step": self.state.step, "valid_loss": round(self.state.last_valid_loss, 6)}
            if self.task:
                final["task_metrics"] = self.last_task_metrics = self.task_metric(valid)
            _write_metric(self.out, final)
        if self.task and valid is not None:
            self.log(f"final {self.task} on the validation set: " + _fmt_metrics(self.last_task_metrics))
        self.save_checkpoint()
        adapter = self.save_adapter()
        return self._finish(adapter, train)

    def _log_truncation(self, train: _data.Dataset) -> None:
        """Once per run: how many records were fitted to --max-seq-len, how, and which were skipped."""
        st = train.stats
        if not (train.truncated or st.get("skipped")):
            return
        how = ", ".join(f"{st[k]} {k.replace('_', ' ')}" for k in ("prompt_cut", "turns_dropped", "end_cut") if st.get(k))
        msg = f"fitted to {self.cfg.max_seq_len} tokens (--truncate {st['truncate']}): {how or 'none'}"
        if st.get("skipped"):
            msg += (f"; skipped {st['skipped']} whose answer alone is longer, e.g. "
                    f"{', '.join(st['skipped_records'][:3])}")
        self.log(msg)

    def _nonfinite(self, loss: float) -> None:
        prev = latest_checkpoint(self.out)
        where = f"the last good checkpoint is {prev}" if prev else "no checkpoint was written yet"
        what = f"loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite"
        raise TrainingError(f"{what} at step {self.state.step + 1}; training stopped before the update, "
                            f"{where}. Lower --lr, add --warmup, or check the data; resume with --resume")

    def _write_run_files(self, train: _data.Dataset, valid: _data.Dataset | None, total: int) -> None:
        _io.write_json(self.out / "config.json", {**self.cfg.to_dict(), "total_steps": total})
        _io.write_json(self.out / RUN_MANIFEST, _io.seal({
            "kind": "edgetune-run", "format": 1, "bundle": _io.relative(self.bundle.root, self.out),
            "bundle_id": self.bundle.base_id, "adapter": self.bundle.manifest["adapter"], "status": "running",
            "data": {"train": _io.relative(train.path, self.out), "valid": _io.relative(valid.path, self.out) if valid else None,
                     "train_sha256": _io.sha256_file(train.path), "format": train.fmt,
                     "examples": len(train), "tokens": train.tokens, "labelled": train.labelled,
                     "truncated": train.truncated,
                     "truncation": {k: v for k, v in train.stats.items() if k != "skipped_records"}},
            "train_providers": self.runner.providers(), "device": self.device.name,
            "graphs": self.runner.graphs, "kernels": self.runner.kernel_info, "packing": self.packing,
        }))

    def _finish(self, adapter: Path, train: _data.Dataset) -> RunResult:
        tps = self.state.tokens / max(1e-9, self.state.elapsed)
        summary = {"steps": self.state.step, "final_loss": self.state.last_loss,
                   "valid_loss": self.state.last_valid_loss, "tokens": self.state.tokens,
                   "labelled_tokens": self.state.labelled, "tokens_per_s": round(tps, 1),
                   "elapsed_s": round(self.state.elapsed, 1), "peak_rss_mb": round(_peak_rss_mb()),
                   "truncated_examples": train.truncated, "adapter": _io.relative(adapter, self.out),
                   **({"task": self.task, "task_metrics": getattr(self, "last_task_metrics", None)} if self.task else {})}
        manifest = _io.read_json(self.out / RUN_MANIFEST, "the run manifest")
        manifest.update(status="complete", summary=summary)
        _io.write_json(self.out / RUN_MANIFEST, _io.seal(manifest))
        plot_loss(self.out)
        return RunResult(self.out, self.state.step, self.state.last_loss, self.state.last_valid_loss, tps, adapter, summary)


def _fmt_metrics(m: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v}" for k, v in m.items() if k not in ("task", "examples"))


def _batch_feed(b: _data.Batch, norm: np.ndarray, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels, "label_norm": norm,
            **extra}


def _set_seed(seed: int) -> None:
    """Seed ONNX Runtime's random generator (dropout), so runs repeat exactly."""
    import onnxruntime as ort

    ort.set_seed(int(seed) % (2**31 - 1))


def _peak_rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:
        return _rss_mb()


_FAULT_HITS: dict[str, int] = {}


def _fault(point: str) -> None:
    """Test hook: ``EDGETUNE_FAULT=point[:n]`` kills the process at the n-th pass, as a power cut would."""
    want = os.environ.get("EDGETUNE_FAULT", "")
    name, _, nth = want.partition(":")
    if name != point:
        return
    _FAULT_HITS[point] = _FAULT_HITS.get(point, 0) + 1
    if _FAULT_HITS[point] >= int(nth or 1):
        os._exit(137)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")


def _bar_update(bar: Any, rec: dict[str, Any]) -> None:
    if bar is None:
        return
    post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}", "mem": f"{rec['rss_mb'] / 1024:.2f}G"}
    if "valid_loss" in rec:
        post["val"] = f"{rec['valid_loss']:.4f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)


def plot_loss(run: Path) -> Path | None:
    """Draw ``loss.png`` from ``metrics.jsonl`` if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["valid_loss"]) for r in recs if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1.2)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over labelled tokens)")
    ax.set_title(f"edgetune: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run / "loss.png"
    _io.write_with(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out


def train(bundle: str | Path, data: str | Path, out: str | Path, resume: bool = False,
          log: Log = print, progress: bool = True, **options: Any) -> RunResult:
    """Train a bundle's adapters on ``data`` into ``out``; ``options`` are TrainConfig fields."""
    from edgetune.formats.config import resolve

    cfg = resolve(TrainConfig, None, **options)
    trainer = Trainer(bundle, out, cfg, resume=resume, log=log, progress=progress)
    tr, va = trainer.load_data(data)
    return trainer.fit(tr, va)
