"""TensorFlow/Keras engine: `model.fit` with one callback that times, scores and reports each epoch."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ..config import TrainParams  # noqa: E402
from ..devices import Runtime  # noqa: E402
from ..errors import TrainingError  # noqa: E402
from ..io import Prepared  # noqa: E402
from ..tasks import Task  # noqa: E402
from . import FitResult, OnEpoch  # noqa: E402

_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
EVAL_BATCH = 4096  # a workload with large samples sets meta['eval_batch_size']


def setup(runtime: Runtime) -> None:
    """Must run before any model is built: device visibility and dtype policy are global in TF."""
    gpus = tf.config.list_physical_devices("GPU")
    visible = [] if runtime.device.type == "cpu" else [gpus[runtime.device.index]]
    tf.config.set_visible_devices(visible, "GPU")
    for gpu in visible:
        tf.config.experimental.set_memory_growth(gpu, True)
    if runtime.cpu_threads:
        tf.config.threading.set_intra_op_parallelism_threads(runtime.cpu_threads)
    keras.mixed_precision.set_global_policy(_POLICIES[runtime.precision])


def threads() -> int:
    return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1


def _sync() -> None:
    # Keras queues GPU work asynchronously; without this the clock reads launch time
    if tf.config.get_visible_devices("GPU"):
        tf.test.experimental.sync_devices()


def _loss(task: Task) -> keras.losses.Loss:
    if task.kind == "binary":
        return keras.losses.BinaryCrossentropy(from_logits=True)
    if task.kind == "multiclass":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return keras.losses.MeanSquaredError()


def _inputs(arrays: dict[str, np.ndarray], inputs: list[str]):
    xs = [arrays[k] for k in inputs]
    return xs[0] if len(xs) == 1 else xs


def _targets(arrays: dict[str, np.ndarray], task: Task) -> np.ndarray:
    y = arrays["y"]
    return y.astype(np.int64) if task.kind == "multiclass" else y.astype(np.float32).reshape(len(y), -1)


class _EpochCallback(keras.callbacks.Callback):
    def __init__(self, task, val, inputs, train, result, on_epoch, bar):
        super().__init__()
        self.task, self.val, self.inputs, self.train = task, val, inputs, train
        self.result, self.on_epoch, self.bar = result, on_epoch, bar
        self.eval_batch = EVAL_BATCH

    def on_epoch_begin(self, epoch, logs=None):
        _sync()
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        _sync()
        self.result.epoch_s.append(time.perf_counter() - self.t0)
        train_loss = float(logs["loss"])
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"training loss became {train_loss} at epoch {epoch + 1} "
                f"(lr={self.train.lr}, batch_size={self.train.batch_size}); lower the learning rate"
            )
        logits = _predict(self.model, self.val, self.inputs, self.eval_batch)
        row = {"train/loss": train_loss, **self.task.metrics(self.val["y"], logits, "val")}
        row["time/this_epoch_s"] = self.result.epoch_s[-1]
        self.result.history.append(row)
        self.bar.update(1)
        if self.on_epoch:
            self.on_epoch(epoch, row)


def fit(
    model: keras.Model,
    task: Task,
    prepared: Prepared,
    train: TrainParams,
    runtime: Runtime,
    on_epoch: OnEpoch | None = None,
    desc: str = "train",
) -> FitResult:
    inputs = prepared.meta.get("inputs", ["x"])
    tr, va = prepared.splits["train"], prepared.splits["val"]
    n_params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    result = FitResult(n_train=len(tr["y"]), n_params=n_params)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=train.lr, weight_decay=train.weight_decay),
        loss=_loss(task),
        jit_compile=runtime.compile,
    )
    _sync()
    t_fit = time.perf_counter()
    with tqdm(total=train.epochs, desc=desc, unit="epoch", leave=False, disable=None) as bar:
        cb = _EpochCallback(task, va, inputs, train, result, on_epoch, bar)
        cb.eval_batch = prepared.meta.get("eval_batch_size", EVAL_BATCH)
        model.fit(
            _inputs(tr, inputs),
            _targets(tr, task),
            batch_size=train.batch_size,
            epochs=train.epochs,
            shuffle=True,
            verbose=0,
            callbacks=[cb],
        )
    _sync()
    result.fit_s = time.perf_counter() - t_fit
    if runtime.device.type == "cuda":
        info = tf.config.experimental.get_memory_info(f"GPU:{0}")
        result.peak_gpu_mb = info["peak"] / 2**20
    return result


def _predict(model: keras.Model, arrays: dict[str, np.ndarray], inputs: list[str], batch: int = EVAL_BATCH) -> np.ndarray:
    n = len(arrays[inputs[0]])
    outs = [
        np.asarray(model(_inputs({k: arrays[k][i : i + batch] for k in inputs}, inputs), training=False))
        for i in range(0, n, batch)
    ]
    return np.concatenate(outs).astype(np.float32)


def predict(
    model: keras.Model, task: Task, arrays: dict[str, np.ndarray], inputs: list[str], runtime: Runtime, batch: int = EVAL_BATCH
) -> np.ndarray:
    return _predict(model, arrays, inputs, batch)


def save(model: keras.Model, folder: Path) -> Path:
    path = Path(folder) / "model.keras"
    model.save(path)
    return path


def load(folder: Path, model: keras.Model, runtime: Runtime) -> keras.Model:
    model.load_weights(Path(folder) / "model.keras")
    return model
