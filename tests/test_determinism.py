"""`deterministic: true`: the same seed gives identical metrics on CPU, for every workload and framework.

In-process and small (conftest's SMALL sizes): each workload's real bundled data, ingested and prepared once,
then trained twice through the real engine with the stage's runtime set-up.
"""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import REPO, shrink
from accelbench.config import with_overrides
from accelbench.project import load_config
from accelbench.engines import get_engine
from accelbench.io import write_json
from accelbench.runtime import runtime_for
from accelbench.workloads import available, get_workload

WORKLOADS = list(available())  # the registry: a seventh workload is tested without editing this file


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    params = shrink(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["deterministic"] = True
    path = tmp_path_factory.mktemp("determinism") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    yield load_config(path)
    import torch

    torch.use_deterministic_algorithms(False)  # global: later tests in this process get the default back


@pytest.fixture(scope="module")
def prepared(config, tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            wl, params = get_workload(name), config.params(name)
            raw = tmp_path_factory.mktemp(f"raw-{name}")
            write_json(raw / "source.json", wl.ingest(params, raw))  # as the ingest stage leaves it
            cache[name] = wl.prepare(params, raw, config.seed)
        return cache[name]

    return get


def train_once(config, name: str, framework: str, prepared) -> list[dict[str, float]]:
    """One training run as the train stage sets it up (runtime, seeding, precompute, model, fit)."""
    wl = get_workload(name)
    runtime = runtime_for(dataclasses.replace(config, framework=framework), wl)  # deterministic kernels, then the seed
    assert runtime.deterministic and runtime.framework == framework
    variant, overrides = next(iter(wl.variants(config.params(name)).items()))
    params = with_overrides(config.params(name), overrides)
    inputs, _ = wl.precompute(params, prepared, runtime)
    model = wl.build_model(framework, params, prepared.meta)
    result = get_engine(framework).fit(model, wl.task(prepared.meta), inputs, params.train, runtime, desc=variant)
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in result.history]


# TensorFlow: one model per kind of randomness (dropout, a two-input LSTM, device augmentation); stock and
# rnn add LSTMs like sentiment's at the cost of seconds each. quantum has no TensorFlow model.
CASES = [(w, "torch") for w in WORKLOADS] + [(w, "tensorflow") for w in ("diabetes", "sentiment", "guava")]


@pytest.mark.parametrize("name, framework", CASES, ids=[f"{w}-{f}" for w, f in CASES])
def test_same_seed_same_metrics(config, prepared, name, framework):
    data = prepared(name)
    first = train_once(config, name, framework, data)
    second = train_once(config, name, framework, data)
    assert first and first[-1], "no metrics recorded"
    assert first == second  # every epoch's loss and scores, bit for bit


def test_fused_optimizer_is_the_same_update(config, prepared):
    """fused_optimizer: AdamW's fused kernel instead of the per-tensor loop, on the CPU: the same losses and
    validation metric within float rounding (summation order), and the fused kernel is what ran."""
    from accelbench.engines import torch as engine

    runs = {fused: train_once(dataclasses.replace(config, fused_optimizer=fused), "stock", "torch", prepared("stock"))
            for fused in (False, True)}  # fmt: skip
    for plain, fused in zip(runs[False], runs[True], strict=True):
        assert fused == pytest.approx(plain, rel=1e-5, abs=1e-7)
    cfg = dataclasses.replace(config, fused_optimizer=True)
    runtime = runtime_for(cfg, get_workload("stock"))
    params = config.params("stock")
    model = get_workload("stock").build_model("torch", params, prepared("stock").meta)
    assert engine._optimizer(model, params.train, runtime, graphed=False).defaults["fused"] is True


def test_compile_runs_the_optimizer_step_compiled_to_the_same_update(config, prepared):
    """compile: AdamW's step through torch.compile too (inductor's kernel, not the per-tensor loop or the fused
    kernel), on the CPU: the same losses and validation metric within float rounding. Dropout off: compiled
    dropout draws its own random numbers."""
    from accelbench.engines import torch as engine

    params = with_overrides(config.params("diabetes"), {"model.dropout": 0.0})
    cfg = dataclasses.replace(config, sections={**config.sections, "diabetes": params})
    runs = {c: train_once(dataclasses.replace(cfg, compile=c), "diabetes", "torch", prepared("diabetes")) for c in (False, True)}
    for plain, compiled in zip(runs[False], runs[True], strict=True):
        assert compiled == pytest.approx(plain, rel=1e-5, abs=1e-7)
    runtime = runtime_for(dataclasses.replace(cfg, compile=True, fused_optimizer=True), get_workload("diabetes"))
    model = get_workload("diabetes").build_model("torch", params, prepared("diabetes").meta)
    opt = engine._optimizer(model, params.train, runtime, graphed=False)
    assert opt.defaults["fused"] is None and hasattr(opt.step, "_torchdynamo_orig_callable")
