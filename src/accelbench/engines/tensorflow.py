"""TensorFlow/Keras engine: `model.fit` with one callback that times, scores and reports each epoch."""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from .. import progress  # noqa: E402
from ..checkpoint import Checkpoint  # noqa: E402
from ..config import TrainParams  # noqa: E402
from ..devices import Runtime  # noqa: E402
from ..errors import DeviceError, TrainingError  # noqa: E402
from ..io import Prepared, atomic_file, read_json, write_json  # noqa: E402
from ..tasks import Task  # noqa: E402
from ..timing import calls_to_last, long_step_count  # noqa: E402
from . import BenchResult, BenchSpec, FitResult, OnEpoch, oom_message  # noqa: E402

_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
EVAL_BATCH = 4096  # a workload with large samples sets meta['eval_batch_size']


def setup(runtime: Runtime) -> None:
    """Must run before any model is built: device visibility and dtype policy are global in TF."""
    gpus = tf.config.list_physical_devices("GPU")
    local = _local_replicas(runtime)
    visible = [] if runtime.device.type == "cpu" else gpus[runtime.device.index : runtime.device.index + local]
    if len(visible) < local and runtime.device.type == "cuda":
        raise DeviceError(f"params.yaml: distributed.gpus: {local} replicas asked for, {len(gpus)} GPU(s) visible to TensorFlow")
    tf.config.set_visible_devices(visible, "GPU")
    for gpu in visible:
        tf.config.experimental.set_memory_growth(gpu, True)
    if runtime.cpu_threads:
        tf.config.threading.set_intra_op_parallelism_threads(runtime.cpu_threads)
    keras.mixed_precision.set_global_policy(_POLICIES[runtime.precision])
    if runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
        _DETERMINISM["enabled"] = True
    if runtime.world_size > 1:  # last: the strategy initialises the runtime, after which threads are fixed
        _distribute(runtime, local)


_DETERMINISM = {"enabled": False}  # TF offers no getter for the op-determinism switch


def _local_replicas(runtime: Runtime) -> int:
    """Replicas on this host: the world size over the workers TF_CONFIG lists (one worker per host)."""
    workers = len(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]) if "TF_CONFIG" in os.environ else 1
    return runtime.world_size // workers


def _distribute(runtime: Runtime, local: int) -> None:
    """Make a MirroredStrategy (one host) or MultiWorkerMirroredStrategy (TF_CONFIG) the global default, so that
    the models the workloads build and `model.fit` are replicated without any workload knowing. On the CPU
    the replicas are logical CPU devices (how data parallelism is tested without GPUs)."""
    if runtime.device.type == "cpu":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * local)
        names = [d.name for d in tf.config.list_logical_devices("CPU")]
    else:
        names = [d.name for d in tf.config.list_logical_devices("GPU")]
    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.MirroredStrategy(names)
    tf.distribute.experimental_set_strategy(strategy)


def determinism_flags() -> dict[str, str]:
    return {"tf.op_determinism": str(_DETERMINISM["enabled"])}


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


def _time_batches(arrays: dict[str, np.ndarray], keys: list[str], bs: int, seed: int) -> float:
    """One epoch of what fit does to get its batches from NumPy (shuffle, gather, copy to the device),
    without the model: the data side of the step time, timed apart."""
    perm = np.random.default_rng(seed).permutation(len(arrays["y"]))
    target = "/GPU:0" if tf.config.get_visible_devices("GPU") else "/CPU:0"
    _sync()
    t0 = time.perf_counter()
    with tf.device(target):
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            for k in keys:
                tf.identity(arrays[k][idx])
    _sync()
    return time.perf_counter() - t0


def _epoch_batches(arrays: dict[str, np.ndarray], inputs: list[str], task: Task, bs: int, seed: int,
                   first: int, epochs: int) -> tf.data.Dataset:  # fmt: skip
    """The batches of epochs `first`..`epochs`-1, each epoch shuffled by a permutation drawn from (seed, epoch)
    alone: a run resumed at epoch k sees the very batches of one that never stopped (Keras' own shuffle
    would start its stream over)."""
    n = len(arrays["y"])
    with tf.device("/CPU:0"):  # tf.data gathers on the host, as Keras does with NumPy input
        xs = tuple(tf.convert_to_tensor(arrays[k]) for k in inputs)
        y = tf.convert_to_tensor(_targets(arrays, task))

    def epoch_order(epoch: tf.Tensor) -> tf.data.Dataset:
        seeds = tf.stack([tf.constant(seed, tf.int64), epoch])
        perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=seeds)
        return tf.data.Dataset.from_tensor_slices(perm).batch(bs)

    def gather(idx: tf.Tensor):
        x = tuple(tf.gather(a, idx) for a in xs)
        return (x[0] if len(x) == 1 else x), tf.gather(y, idx)

    return tf.data.Dataset.range(first, epochs).flat_map(epoch_order).map(gather).prefetch(tf.data.AUTOTUNE)


class _EpochCallback(keras.callbacks.Callback):
    def __init__(self, task, val, inputs, train, result, on_epoch, bar, checkpoint):
        super().__init__()
        self.task, self.val, self.inputs, self.train = task, val, inputs, train
        self.result, self.on_epoch, self.bar, self.checkpoint = result, on_epoch, bar, checkpoint
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
        if self.checkpoint and self.checkpoint.due(epoch + 1, self.train.epochs):
            _save(self.checkpoint, epoch + 1, self.model, self.result)
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
    checkpoint: Checkpoint | None = None,
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
    start = _resume(checkpoint, model, result)
    _sync()
    t_fit = time.perf_counter()
    with progress.bar(train.epochs, desc, "epoch", initial=start) as bar:
        # every worker resumes from the checkpoint; only the chief (rank 0) writes it
        cb = _EpochCallback(task, va, inputs, train, result, on_epoch, bar, checkpoint if runtime.is_main else None)
        cb.eval_batch = prepared.meta.get("eval_batch_size", EVAL_BATCH)
        try:
            model.fit(
                _epoch_batches(tr, inputs, task, train.batch_size, runtime.seed, start, train.epochs),
                epochs=train.epochs,
                initial_epoch=start,
                steps_per_epoch=math.ceil(len(tr["y"]) / train.batch_size),
                shuffle=False,  # the dataset is shuffled per epoch already
                verbose=0,
                callbacks=[cb],
            )
        except tf.errors.ResourceExhaustedError as exc:
            raise TrainingError(oom_message(exc.message, train.batch_size, runtime)) from None
    _sync()
    result.fit_s = time.perf_counter() - t_fit
    result.data_epoch_s = _time_batches(tr, [*inputs, "y"], train.batch_size, runtime.seed)
    if runtime.device.type == "cuda":
        info = tf.config.experimental.get_memory_info(f"GPU:{0}")
        result.peak_gpu_mb = info["peak"] / 2**20
    return result


def _save(checkpoint: Checkpoint, epoch: int, model: keras.Model, result: FitResult) -> None:
    """Weights, RNG states (dropout, augmentation) and optimiser slots as one .npz (renamed into place),
    progress as JSON beside it."""
    arrays = {f"w{i}": np.asarray(v) for i, v in enumerate(model.variables)}  # variables: seed generators too
    arrays.update({f"o{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)})
    weights = checkpoint.path.with_name(f"{checkpoint.path.name}.e{epoch}.npz")
    with atomic_file(weights) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    # the JSON names its weights file and is renamed into place last: a kill in between keeps the old pair
    state = {"params_hash": checkpoint.params_hash, "epoch": epoch, "weights": weights.name, "variables": len(model.variables),
             "history": result.history, "epoch_s": result.epoch_s}  # fmt: skip
    write_json(checkpoint.path.with_suffix(".json"), state)
    for old in checkpoint.path.parent.glob(f"{checkpoint.path.name}.e*.npz"):
        if old != weights:
            old.unlink()


def _resume(checkpoint: Checkpoint | None, model: keras.Model, result: FitResult) -> int:
    if checkpoint is None or not checkpoint.path.with_suffix(".json").is_file():
        return 0
    state = read_json(checkpoint.path.with_suffix(".json"))
    if state["params_hash"] != checkpoint.params_hash or state.get("variables") != len(model.variables):
        return 0  # other params, or written before RNG states were saved: start fresh
    with np.load(checkpoint.path.parent / state["weights"], allow_pickle=False) as z:
        for i, v in enumerate(model.variables):
            v.assign(z[f"w{i}"])
        model.optimizer.build(model.trainable_variables)
        for i, v in enumerate(model.optimizer.variables):
            v.assign(z[f"o{i}"])
    result.history, result.epoch_s, result.resumed_from = state["history"], state["epoch_s"], state["epoch"]
    return state["epoch"]


class _RepeatTimer(keras.callbacks.Callback):
    """Each Keras 'epoch' is one repeat of `steps` steps; epoch 0 is the warm-up (tracing, XLA)."""

    def __init__(self, energy, timed_from: Callable[[], None] | None = None):
        super().__init__()
        self.energy, self.times, self.joules, self.timed_from = energy, [], [], timed_from

    def on_epoch_begin(self, epoch, logs=None):
        _sync()
        if epoch == 1 and self.timed_from:  # the interval's timed epochs start here
            self.timed_from()
        self.e0 = self.energy() if self.energy else None
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        _sync()
        self.times.append(time.perf_counter() - self.t0)
        if self.energy:
            self.joules.append(self.energy() - self.e0)


def bench(model: keras.Model, task: Task, prepared: Prepared, train: TrainParams, runtime: Runtime, spec: BenchSpec) -> BenchResult:
    """Same contract as the torch engine's bench, through `model.fit` on a tf.data pipeline (Keras' fast path).
    Each interval is one fit whose first epoch is untimed: the warm-up in the first, a re-warm in the others.
    GPU utilisation is not sampled here (`spec.utilisation` is the torch engine's)."""
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=train.lr, weight_decay=train.weight_decay),
        loss=_loss(task),
        jit_compile=runtime.compile,
    )
    ds = _bench_batches(prepared, task, spec, runtime.seed)
    steps, sized_s = _steps_per_repeat(model, ds, spec)
    plan = spec.plan()
    times, joules, warmup_s = [], [], sized_s
    for count in plan.counts:
        timer = _RepeatTimer(spec.energy, plan.begin)
        model.fit(ds, epochs=1 + count, steps_per_epoch=steps, verbose=0, callbacks=[timer])
        plan.end()
        warmup_s += timer.times[0] if not times else 0.0
        times += timer.times[1:]
        joules += timer.joules[1:]
    peak = None
    if runtime.device.type == "cuda":
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return BenchResult(spec.batch_size, steps, times, warmup_s, 0.0, joules if spec.energy else None, peak,
                       interval_of=plan.interval_of())  # fmt: skip


def _bench_batches(prepared: Prepared, task: Task, spec: BenchSpec, seed: int) -> tf.data.Dataset:
    """Endless batches of the training split, shuffled; `synthetic`: one batch drawn up front, repeated."""
    tr = prepared.splits["train"]
    x, y = _inputs(tr, prepared.meta.get("inputs", ["x"])), _targets(tr, task)
    if spec.synthetic:
        idx = np.random.default_rng(seed).integers(0, len(y), spec.batch_size)
        xb = [a[idx] for a in x] if isinstance(x, list) else x[idx]
        return tf.data.Dataset.from_tensors((xb, y[idx])).repeat()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().shuffle(min(len(y), 10_000), seed=seed)
    return ds.batch(spec.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _steps_per_repeat(model: keras.Model, ds: tf.data.Dataset, spec: BenchSpec) -> tuple[int, float]:
    """The steps a timed repeat runs to last `min_repeat_s`, and the seconds spent finding out. The sizing is
    a fit of its own, which also traces the step once for the timed fits. As in the torch engine, `spec.steps`
    run again as often as needed, or long steps by `long_step_count`."""
    if spec.min_repeat_s <= 0:
        return spec.steps, 0.0
    sizing = _RepeatTimer(None)
    model.fit(ds, epochs=2, steps_per_epoch=spec.steps, verbose=0, callbacks=[sizing])
    repeat_s = sizing.times[1]
    steps = long_step_count(spec.min_repeat_s, spec.steps, repeat_s / spec.steps)
    return steps or spec.steps * calls_to_last(spec.min_repeat_s, repeat_s), sum(sizing.times)


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
