"""Quanvolutional network: simulators against PennyLane, both modes training, the MNIST CSV path, bad input."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pennylane as qml
import pytest
import torch

from conftest import assert_failure_recorded, error_lines
from accelbench.errors import DataError
from accelbench.models.quanv import initial_weights, patch_qnode, random_layers
from accelbench.models.quanv_sim import circuit_unitary
from accelbench.workloads.quantum import Circuits, Quanv, circuit_images, quanvolution, read_digits_csv

FIX = Path(__file__).resolve().parent / "fixtures" / "quantum"
HAS_LIGHTNING = importlib.util.find_spec("pennylane_lightning") is not None
SIMULATORS = [
    "unitary",
    "lightcone",
    "default.qubit",
    pytest.param("lightning.qubit", marks=pytest.mark.skipif(not HAS_LIGHTNING, reason="pennylane-lightning is not installed")),
]
CIRCUITS = {  # the demo's circuit, and one with fewer qubits than pixels, overlapping patches and 2 layers
    "2x2-4q": Quanv(),
    "3x3-4q-2l": Quanv(qubits=4, layers=2, seed=7, patch=3, stride=1),
}


def per_patch_reference(q: Quanv, images: np.ndarray) -> np.ndarray:
    """One QNode call per patch: the definition every simulator must reproduce."""
    qnode, weights = patch_qnode(q), initial_weights(q)
    side = (images.shape[-1] - q.patch) // q.stride + 1
    out = np.zeros((len(images), q.qubits, side, side))
    for i, img in enumerate(images[:, 0]):
        for r in range(side):
            for c in range(side):
                patch = img[r * q.stride : r * q.stride + q.patch, c * q.stride : c * q.stride + q.patch]
                out[i, :, r, c] = [float(v) for v in qnode(patch.reshape(-1), weights)]
    return out


@pytest.mark.parametrize("trainable", [False, True], ids=["fixed", "trainable"])
@pytest.mark.parametrize("simulator", SIMULATORS)
@pytest.mark.parametrize("circuit", list(CIRCUITS))
def test_every_simulator_equals_the_per_patch_qnode(circuit, simulator, trainable):
    q = replace(CIRCUITS[circuit], simulator=simulator)
    images = np.random.default_rng(3).uniform(0, 1, (2, 1, 6, 6))
    layer = quanvolution(q, trainable=trainable, dtype="float64")
    with torch.no_grad():
        got = layer(torch.from_numpy(images)).numpy()
    assert got.shape == (2, q.qubits, *per_patch_reference(q, images[:1]).shape[2:])
    np.testing.assert_allclose(got, per_patch_reference(q, images), atol=1e-6, rtol=0)


@pytest.mark.parametrize("circuit", list(CIRCUITS))
def test_trainable_unitary_is_pennylanes_matrix_and_has_its_gradients(circuit):
    q = CIRCUITS[circuit]
    layer = quanvolution(q, trainable=True, dtype="float64")
    weights = np.random.default_rng(11).uniform(0, 2 * np.pi, (q.layers, q.qubits))
    with torch.no_grad():
        layer.weights.copy_(torch.from_numpy(weights))
    split = layer.split_unitary().detach().numpy()  # [Re U^T | Im U^T]
    dim = split.shape[0]
    np.testing.assert_allclose((split[:, :dim] + 1j * split[:, dim:]).T, circuit_unitary(q, weights), atol=1e-12)

    images = torch.from_numpy(np.random.default_rng(5).uniform(0, 1, (2, 1, 6, 6)))
    coeffs = torch.from_numpy(np.random.default_rng(6).normal(size=tuple(layer(images).shape)))
    (layer(images) * coeffs).sum().backward()

    @qml.qnode(qml.device("default.qubit", wires=q.qubits), interface="torch", diff_method="parameter-shift")
    def circuit_fn(pixels, w):
        for j, value in enumerate(pixels):
            qml.RY(np.pi * value, wires=j % q.qubits)
        random_layers(q, w)
        return [qml.expval(qml.PauliZ(k)) for k in range(q.qubits)]

    w = torch.tensor(weights, requires_grad=True)
    side = coeffs.shape[-1]
    loss = 0
    for i in range(2):
        for r in range(side):
            for c in range(side):
                patch = images[i, 0, r * q.stride : r * q.stride + q.patch, c * q.stride : c * q.stride + q.patch]
                loss = loss + (torch.stack(circuit_fn(patch.reshape(-1), w)) * coeffs[i, :, r, c]).sum()
    loss.backward()
    assert w.grad.abs().max() > 1e-3  # a real gradient, not zeros on both sides
    np.testing.assert_allclose(layer.weights.grad.numpy(), w.grad.numpy(), atol=1e-6)


FAST = {"4q-2x2": Quanv(), "9q-3x3": Quanv(qubits=9, patch=3, stride=3)}


@pytest.mark.parametrize("simulator", ["unitary", "lightcone"])
@pytest.mark.parametrize("circuit", list(FAST))
def test_fp32_device_path_matches_default_qubit_and_its_gradients(circuit, simulator):
    """The fp32 layer (fixed and trainable) against PennyLane's default.qubit in float64, values and weight
    gradients. Tolerance: each amplitude is a sum of at most 2^9 fp32 products of magnitude <= 1, so a <Z>
    is off by at most ~sqrt(512) x 1.2e-7 ~ 3e-6 (measured: 4e-7); 1e-5 still catches a wrong gate, sign or
    wire (errors of order 0.1). A gradient sums up to 2 x 9 patches x N(0, 1) coefficients: 2e-5 (measured 5e-7)."""
    q = replace(FAST[circuit], simulator=simulator)
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.uniform(0, 1, (2, 1, 6, 6)))
    reference = quanvolution(replace(q, simulator="default.qubit"), trainable=True, dtype="float64")
    expected = reference(x)
    coeffs = torch.from_numpy(rng.normal(size=tuple(expected.shape)))
    (expected * coeffs).sum().backward()
    assert reference.weights.grad.abs().max() > 1e-2  # a real gradient to compare with
    with torch.no_grad():
        fixed = quanvolution(q)(x.float())
    trainable = quanvolution(q, trainable=True)
    got = trainable(x.float())
    (got * coeffs.float()).sum().backward()
    for values in (fixed, got):
        np.testing.assert_allclose(values.detach().numpy(), expected.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(trainable.weights.grad.numpy(), reference.weights.grad.numpy(), atol=2e-5, rtol=0)


def test_light_cones_are_smaller_than_the_circuit():
    from accelbench.models.quanv_sim import circuit_cones

    cones = circuit_cones(Quanv(qubits=9, patch=3, stride=1), light=True)
    assert sorted(w for c in cones for w in c.outputs) == list(range(9))  # every qubit measured once
    assert max(len(c.wires) for c in cones) < 9  # else the 9-qubit benchmark gains nothing from them


def test_kaggle_test_csv_without_labels_reads_for_the_benchmark():
    labels, images = read_digits_csv(FIX / "test_no_label.csv", labelled=False)  # pixel0..pixel783, 5 rows
    _, train = read_digits_csv(FIX / "train.csv")
    assert labels is None
    np.testing.assert_array_equal(images, train[:5])  # the fixture is train.csv's first rows without labels
    labels, _ = read_digits_csv(FIX / "train.csv", labelled=False)  # a label column is still recognised
    assert labels is not None and len(labels) == 100
    x, origin, distinct = circuit_images(Circuits(images=12, side=14, source="path", path=str(FIX / "test_no_label.csv")))
    assert x.shape == (12, 1, 14, 14) and x.dtype == np.float32 and distinct == 5
    assert "test_no_label.csv resized to 14x14" in origin
    np.testing.assert_array_equal(x[5], x[0])  # rows repeat in order up to the set size
    x, origin, distinct = circuit_images(Circuits(images=3))
    assert x.shape == (3, 1, 28, 28) and 0 <= x.min() and x.max() <= 1 and distinct == 1797


@pytest.mark.parametrize(
    "content, needles",
    [
        ("pixel0,pixel1,pixel2\n1,2,3\n", ["bad.csv", "3 pixel columns", "expected a square number (784 for 28x28"]),
        ("pixel0,pixel1,pixel2,pixel3\n1,2,x,4\n", ["bad.csv", "column 'pixel2', row 2", "'x' is not an integer"]),
        ("pixel0,pixel1,pixel2,pixel3\n1,2,300,4\n", ["bad.csv", "column 'pixel2', row 2", "expected integers 0..255"]),
        ("", ["bad.csv", "file is empty"]),
    ],
    ids=["not-square", "not-a-number", "out-of-range", "empty"],
)
def test_bad_benchmark_csv_names_file_field_and_expectation(tmp_path, content, needles):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(DataError) as err:
        circuit_images(Circuits(source="path", path=str(tmp_path / "bad.csv")))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


@pytest.mark.gpu
@pytest.mark.parametrize("simulator", ["unitary", "lightcone"])
@pytest.mark.parametrize("trainable", [False, True], ids=["fixed", "trainable"])
def test_cuda_eager_and_compiled_layers_match_the_cpu(simulator, trainable):
    q = Quanv(simulator=simulator)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    layers = {"cpu": quanvolution(q, trainable=trainable), "cuda": quanvolution(q, trainable=trainable).cuda()}
    outputs = {}
    for name, run in (("cpu", layers["cpu"]), ("cuda", layers["cuda"]), ("compiled", torch.compile(layers["cuda"]))):
        out = run(x.to("cpu" if name == "cpu" else "cuda"))
        if trainable:
            out.sum().backward()
        outputs[name] = out.detach().cpu().numpy()
    for name in ("cuda", "compiled"):
        np.testing.assert_allclose(outputs[name], outputs["cpu"], atol=1e-5, rtol=0)
    if trainable:  # the compiled and eager CUDA steps both accumulated into the same weights' gradient
        np.testing.assert_allclose(layers["cuda"].weights.grad.cpu().numpy() / 2, layers["cpu"].weights.grad.numpy(), rtol=1e-4)


@pytest.mark.gpu
def test_circuits_benchmark_on_cuda_sets_the_goals_beside_mnists_size():
    from accelbench.config import BenchmarkConfig, with_overrides
    from accelbench.devices import Runtime, resolve
    from accelbench.workloads.quantum import Params, benchmark_circuits

    params = with_overrides(Params(), {"benchmark.circuits.images": 70000, "benchmark.circuits.modes": ["fixed", "trainable"],
                                       "benchmark.circuits.chunk_amplitudes": 1 << 26, "benchmark.circuits.compile": [False, True]})  # fmt: skip
    records = benchmark_circuits(params, Runtime(resolve("cuda", "torch"), "torch"), BenchmarkConfig(repeats=2, intervals=2))
    by_variant = {r["variant"]: r for r in records}
    assert set(by_variant) == {f"{m}-{s}{c}" for m in ("fixed", "trainable") for s in ("unitary", "lightcone") for c in ("", "-compiled")}
    fixed = by_variant["fixed-unitary"]
    assert fixed["circuits"] == 70000 * 14 * 14 and fixed["goal_set_ms"] == 20.0 and fixed["goal_circuits_per_s"] == 2e9
    assert fixed["compile"] == "false" and by_variant["fixed-unitary-compiled"]["compile"] == "true"
    assert all(r["bench/peak_gpu_mb"] > 0 and r["bench/circuits_per_s"] > 0 for r in records)


def test_mnist_csv_with_and_without_header_reads_alike():
    y_kaggle, x_kaggle = read_digits_csv(FIX / "train.csv")  # label,pixel0..pixel783
    y_named, x_named = read_digits_csv(FIX / "mnist_in_csv.csv")  # label,1x1..28x28
    y_bare, x_bare = read_digits_csv(FIX / "no_header.csv")
    assert x_kaggle.shape == (100, 28, 28) and x_kaggle.max() <= 255
    assert sorted(np.bincount(y_kaggle)) == [10] * 10
    for y, x in ((y_named, x_named), (y_bare, x_bare)):
        np.testing.assert_array_equal(y, y_kaggle[:12])
        np.testing.assert_array_equal(x, x_kaggle[:12])


def test_global_tensorflow_leaves_quantum_on_torch(tmp_path):
    from accelbench.project import load_config
    from accelbench.runtime import runtime_for
    from accelbench.workloads import get_workload

    path = tmp_path / "params.yaml"
    path.write_text("workloads: [quantum]\nframework: tensorflow\nquantum: {framework: torch}\n")
    assert runtime_for(load_config(path), get_workload("quantum")).framework == "torch"


# ---------------------------------------------------------------- the real stages


def _only_quantum(project, **dotted) -> None:
    """This workload alone, on one thread: tiny models on a shared 2-core machine run faster so."""
    project.update("workloads", ["quantum"])
    project.update("cpu_threads", 1)
    for key, value in dotted.items():
        project.update(key, value)
    project.run("git", "commit", "-qam", "quantum only")


def run_stages(project, *stages: str) -> None:
    for stage in stages:
        proc = project.stage(stage, "quantum")
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-3000:]}"


CIRCUIT_IMAGES = 16  # the circuits benchmark's set in the stage tests: 16 images of 28x28


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Every stage of the workload on the bundled digits, shrunk by conftest.SMALL (the stage scripts
    that `dvc repro` runs, called directly: test_pipeline covers DVC itself)."""
    from conftest import make_project

    project = make_project(tmp_path_factory.mktemp("quantum") / "project")
    _only_quantum(project, **{"quantum.benchmark.circuits.images": CIRCUIT_IMAGES})
    run_stages(project, "ingest", "eda", "prepare", "tune", "train", "benchmark")
    return project


def test_stages_compare_quanv_and_raw_heads(digits):
    root = digits.root
    for path in ["results/quantum/eda/digits.png", "results/quantum/eda/class_balance.png",
                 "models/quantum/quanv/model.pt", "models/quantum/raw/model.pt",
                 "results/quantum/plots/quanv_test_quantum_channels.png",
                 "results/quantum/plots/quanv_confusion_test.png", "results/quantum/plots/raw_confusion_test.png"]:  # fmt: skip
        assert (root / path).is_file(), path
    eda = json.loads((root / "results/quantum/eda/eda.json").read_text())
    assert eda["rows"] == 1797 and eda["image_size"] == 8 and eda["pixel_max"] == 16
    evaluated = json.loads((root / "results/quantum/evaluate.json").read_text())
    assert set(evaluated) == {"quanv", "raw", "verdict"}  # quanv judged against raw pixels, its reference
    for variant in ("quanv", "raw"):
        assert evaluated[variant]["test/accuracy"] > 0.5, variant  # 10 classes: chance is 0.1
        assert 0 < evaluated[variant]["test/macro_f1"] <= 1
    trained = json.loads((root / "results/quantum/train.json").read_text())
    quanv = trained["quanv"]
    assert quanv["quantum/circuits"] == 1797 * 16  # every 2x2 patch of every 8x8 image, once
    assert quanv["time/quantum_s"] > 0 and quanv["throughput/circuits_per_s"] > 0
    assert "time/quantum_s" not in trained["raw"]
    best = json.loads((root / "results/quantum/best_params.json").read_text())
    assert best["quanv"]["study"] == "quantum-quanv-cpu-torch" and best["raw"]["study"] == "quantum-raw-cpu-torch"


def test_benchmark_times_each_variant_on_its_own_inputs(digits):
    records = json.loads((digits.root / "results/quantum/benchmark.json").read_text())["records"]
    assert {r["variant"] for r in records if r["kind"] == "throughput"} == {"quanv", "raw"}
    assert all(r["bench/samples_per_s"] > 0 for r in records if r["kind"] == "throughput")
    assert {r["variant"] for r in records if r["kind"] == "time_to_target"} == {"quanv", "raw"}
    for run in digits.runs("quantum", "tags.kind = 'time_to_target'"):  # logged after its training, spanning it
        seconds = run.data.metrics.get("bench/time_to_target_s")
        assert seconds, f"{run.info.run_name}: val/accuracy 0.90 not reached"
        assert run.info.end_time - run.info.start_time >= int(1000 * seconds), run.info.run_name


def test_benchmark_measures_circuits_per_second_of_each_mode(digits):
    records = json.loads((digits.root / "results/quantum/benchmark.json").read_text())["records"]
    circuits = {r["variant"]: r for r in records if r["kind"] == "circuits"}
    assert set(circuits) == {f"{m}-{s}" for m in ("fixed", "trainable", "patch3") for s in ("unitary", "lightcone")}
    for rec in circuits.values():
        side = 26 if rec["mode"] == "patch3" else 14  # 3x3 stride 1 | 2x2 stride 2, on 28x28
        assert rec["circuits"] == CIRCUIT_IMAGES * side * side and rec["qubits"] == (9 if rec["mode"] == "patch3" else 4)
        assert rec["device"] == "cpu" and rec["source"] == "sklearn digits 8x8 resized to 28x28"
        repeats = rec["repeats"]["bench/repeat_circuits_per_s"]
        assert len(repeats) == 2 and min(repeats) > 0  # conftest shrinks benchmark.repeats to 2
        assert min(repeats) <= rec["bench/circuits_per_s"] <= max(repeats)
        assert rec["bench/set_ms"] > 0 and rec["goal_set_ms"] is None  # a set time goal only for 70,000 x 28x28
    runs = digits.runs("quantum", "tags.kind = 'circuits'")
    assert {r.info.run_name for r in runs} == {f"circuits-{v}-cpu-torch" for v in circuits}
    for run in runs:
        rec = circuits[run.data.tags["variant"]]
        assert run.info.status == "FINISHED" and run.data.tags["stage"] == "benchmark"
        assert run.data.tags["compile"] == rec["compile"] == "false"  # circuits.compile null: the global setting
        assert run.data.metrics["bench/circuits_per_s"] == pytest.approx(rec["bench/circuits_per_s"])
        history = digits.client().get_metric_history(run.info.run_id, "bench/repeat_circuits_per_s")
        assert len(history) == 2
        passes_ms = 1000 * rec["bench/warmup_s"] + sum(1000 * rec["circuits"] / r for r in rec["repeats"]["bench/repeat_circuits_per_s"])
        assert run.info.end_time - run.info.start_time >= int(passes_ms), "the run spans its passes"
        assert "start_ms" not in run.data.tags


def test_report_tables_circuits_per_device_with_the_gpus_goals(digits, tmp_path):
    """The stage's CPU runs, and GPU runs of the same host logged here (after the tests reading the store's
    circuits runs): one goal met, one missed, each against the same host's CPU."""
    from accelbench.report import build

    client = digits.client()
    cpu = {r.data.tags["variant"]: r for r in digits.runs("quantum", "tags.kind = 'circuits'")}
    for variant, rate, set_ms in [("fixed-unitary", 2.5e9, 5.49), ("patch3-lightcone", 4e7, 1182.0)]:
        tags = {**{k: v for k, v in cpu[variant].data.tags.items() if not k.startswith("mlflow.")}, "device": "cuda", "device_name": "NVIDIA FakeGPU", "images": "70000",
                "goal_set_ms": "20.0" if variant.startswith("fixed") else "None"}  # fmt: skip
        run = client.create_run(cpu[variant].info.experiment_id, run_name=f"benchmark-cuda-torch-circuits-{variant}", tags=tags)
        client.log_metric(run.info.run_id, "bench/circuits_per_s", rate)
        client.log_metric(run.info.run_id, "bench/set_ms", set_ms)
        client.set_terminated(run.info.run_id, "FINISHED")
    build(f"sqlite:///{digits.root / 'mlruns' / 'mlflow.db'}", tmp_path / "reports")
    lines = (tmp_path / "reports" / "report.md").read_text().splitlines()
    assert "## Quantum circuits" in lines
    gpu = lines[lines.index("### Quantum circuits: NVIDIA FakeGPU") + 4 :][:2]
    fixed_x = 2.5e9 / cpu["fixed-unitary"].data.metrics["bench/circuits_per_s"]
    patch3_x = 4e7 / cpu["patch3-lightcone"].data.metrics["bench/circuits_per_s"]
    assert gpu[0].startswith("| fixed | unitary | false | 4 | 2x2 stride 2 | 70000 x 28x28 | 2.50 G | >= 2.00 G: met | 5.49 | < 20: met |")
    assert gpu[0].endswith(f"| {fixed_x:,.0f}x |") and gpu[1].endswith(f"| 1,182.00 |  | {patch3_x:,.0f}x |")
    assert "| 40.00 M | >= 50.00 M: missed |" in gpu[1]
    heading = next(line for line in lines if line.startswith("### Quantum circuits: ") and "FakeGPU" not in line)
    rows = lines[lines.index(heading) + 4 :][:6]  # the stage's six CPU measurements, without goals
    assert [r.split(" | ")[:2] for r in rows] == [["| fixed", "lightcone"], ["| fixed", "unitary"], ["| trainable", "lightcone"],
                                                  ["| trainable", "unitary"], ["| patch3", "lightcone"], ["| patch3", "unitary"]]  # fmt: skip
    assert all(" | 16 x 28x28 | " in r for r in rows), rows
    header = lines[lines.index(heading) + 2]
    assert "goal" not in header and "vs same host's CPU" not in header, "a CPU has no goals: those columns stay out"
    assert "Left out, no row has a value: goal, set goal ms, vs same host's CPU." in lines[lines.index(heading) + 4 + 6 + 1]


def test_each_variant_is_its_own_finished_run(digits):
    runs = digits.runs("quantum", "tags.stage = 'train'")
    assert {r.info.run_name for r in runs} == {"train-cpu-torch-quanv", "train-cpu-torch-raw"}
    assert all(r.info.status == "FINISHED" for r in runs)
    by_variant = {r.data.tags["variant"]: r for r in runs}
    quanv, raw = by_variant["quanv"], by_variant["raw"]
    assert quanv.data.tags["quanv.simulator"] == "unitary" and quanv.data.tags["quanv.mode"] == "fixed"
    assert quanv.data.params["model.quanv.qubits"] == "4" and raw.data.params["model.features"] == "raw"
    for key in ("model.head", "model.hidden", "train.epochs", "train.batch_size"):  # the same head and budget
        assert quanv.data.params[key] == raw.data.params[key], key
    assert "throughput/circuits_per_s" in quanv.data.metrics
    artifacts = digits.artifacts(digits.runs("quantum", "tags.stage = 'evaluate' and tags.variant = 'quanv'")[0].info.run_id, "plots")
    assert "plots/quanv_test_quantum_channels.png" in artifacts


def test_trainable_mode_learns_the_circuit_weights(digits):  # after the tests reading the fixed run
    digits.update("quantum.model.quanv.mode", "trainable")
    try:
        run_stages(digits, "train")
    finally:
        digits.update("quantum.model.quanv.mode", "fixed")
    state = torch.load(digits.root / "models/quantum/quanv/model.pt", weights_only=True)
    learned = state["0.weights"].numpy()
    assert learned.shape == (1, 4)
    assert np.abs(learned - initial_weights(Quanv())).max() > 1e-4  # backprop moved them
    run = digits.runs("quantum", "tags.stage = 'train' and tags.variant = 'quanv'")[0]
    assert run.data.tags["quanv.mode"] == "trainable" and run.info.status == "FINISHED"
    assert "time/quantum_s" not in run.data.metrics  # nothing precomputed: the circuit runs in every step
    evaluated = json.loads((digits.root / "results/quantum/evaluate.json").read_text())
    assert evaluated["quanv"]["test/accuracy"] > 0.5  # 10 classes: chance is 0.1


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """Raw and prepared data from the Kaggle-format MNIST CSV fixture, resized 28 -> 14."""
    from conftest import make_project

    project = make_project(tmp_path_factory.mktemp("mnist") / "project")
    _only_quantum(project, **{"quantum.data.source": "path", "quantum.data.path": str(FIX / "train.csv"),
                              "quantum.prepare.image_size": 14})  # fmt: skip
    run_stages(project, "ingest", "prepare")
    return project


def test_csv_path_trains_on_the_fixture(mnist):
    meta = json.loads((mnist.root / "data/prepared/quantum/meta.json").read_text())
    assert meta["image_size"] == 14 and meta["stored_image_size"] == 28 and meta["pixel_max"] == 255
    run_stages(mnist, "train")
    trained = json.loads((mnist.root / "results/quantum/train.json").read_text())
    assert trained["quanv"]["quantum/circuits"] == 100 * 7 * 7  # 2x2 patches, stride 2, on 14x14


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")) if folder.exists() else []:
        h.update(str(f.relative_to(folder)).encode() + (f.read_bytes() if f.is_file() else b""))
    return h.hexdigest()


def assert_clean_failure(project, proc, stage: str, output: Path, before: str, *needles: str) -> None:
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _tree_digest(output) == before, f"{output} changed"
    assert not list(output.parent.glob(f".{output.name}.*")), "a temp folder was left behind"
    assert_failure_recorded(project, "quantum", stage, needles[-1])


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"patch": 3, "stride": 2}, ["quantum.model.quanv.patch/stride", "does not tile the 14x14 image"]),
        ({"qubits": 5}, ["quantum.model.quanv.qubits", "has 4 pixels"]),
        ({"qubits": 20, "patch": 5, "stride": 3}, ["quantum.model.quanv.qubits", "use quanv.simulator default.qubit"]),
    ],
    ids=["patch-does-not-tile", "more-qubits-than-pixels", "unitary-too-large"],
)
def test_bad_circuit_fails_cleanly(mnist, overrides, needles):
    models = mnist.root / "models" / "quantum"
    before = _tree_digest(models)
    original = mnist.params()["quantum"]["model"]["quanv"]
    mnist.update("quantum.model.quanv", {**original, **overrides})
    try:
        proc = mnist.stage("train", "quantum")
    finally:
        mnist.update("quantum.model.quanv", original)
    assert_clean_failure(mnist, proc, "train", models, before, *needles)


@pytest.mark.parametrize(
    "fixture, needles",
    [
        ("test_no_label.csv", ["test_no_label.csv", "no 'label' column"]),
        ("pixel_out_of_range.csv", ["pixel_out_of_range.csv", "column 'pixel300', row 5", "expected integers 0..255"]),
    ],
)
def test_bad_csv_fails_at_ingest(mnist, fixture, needles):
    raw = mnist.root / "data" / "raw" / "quantum"
    before = _tree_digest(raw)  # the good fixture's data: a failed ingest must leave it as it was
    mnist.update("quantum.data.path", str(FIX / fixture))
    try:
        proc = mnist.stage("ingest", "quantum")
    finally:
        mnist.update("quantum.data.path", str(FIX / "train.csv"))
    assert_clean_failure(mnist, proc, "ingest", raw, before, *needles)


@pytest.mark.parametrize("variant, head", [("quanv", "dense"), ("raw", "conv")])
def test_population_of_heads_matches_one_by_one(digits, variant, head):
    """The population trains the head on the variant's inputs (quantum features computed once) exactly as
    one-by-one training does. The same float32 arithmetic per member; only the summation order differs: ~1e-7
    relative per op for the batched matmuls (dense: 1e-5 as for diabetes), while vmap turns N convolutions
    into one grouped convolution with another kernel, whose rounding differences compound through 12 Adam
    steps at lr up to 3e-2 (conv: 1e-4, still far below the gaps between members asserted at the end)."""
    from accelbench.config import with_overrides
    from accelbench.project import load_config
    from accelbench.devices import Device, Runtime, seed_everything
    from accelbench.engines import torch as engine
    from accelbench.io import load_prepared
    from accelbench.population import Population, fit_population
    from accelbench.workloads import get_workload

    wl = get_workload("quantum")
    base = load_config(digits.root / "params.yaml").params("quantum")
    params = with_overrides(base, {"model.features": variant, "model.head": head, "model.hidden": 8, "train.epochs": 3})
    full = load_prepared(digits.root / "data/prepared/quantum")
    rows = {"train": 256, "val": 128, "test": 10}  # a slice keeps quanvolving and training to a second or two
    prepared = replace(full, splits={k: {a: v[: rows[k]] for a, v in arrays.items()} for k, arrays in full.splits.items()})
    runtime = Runtime(Device("cpu", 0, "cpu"), "torch", seed=42)
    tol = 1e-5 if head == "dense" else 1e-4
    build, inputs = wl.population_model(params, prepared, runtime)
    assert inputs.splits["train"]["x"].shape[1] == (4 if variant == "quanv" else 1)  # quantum channels or pixels
    task, lrs, wds = wl.task(prepared.meta), [1e-3, 1e-2, 3e-2], [0.0, 0.01, 0.001]
    one_by_one = []
    for lr, wd in zip(lrs, wds):
        p = with_overrides(params, {"train.lr": lr, "train.weight_decay": wd})
        seed_everything(42, "torch")
        one_by_one.append(engine.fit(build(p), task, inputs, p.train, runtime).history[-1])
    models = []
    for _ in lrs:
        seed_everything(42, "torch")
        models.append(build(params))
    pop = fit_population(Population(models, lrs, wds), task, inputs, 3, params.train.batch_size, runtime)
    for i, ref in enumerate(one_by_one):
        assert pop.curves["train/loss"][-1, i].item() == pytest.approx(ref["train/loss"], rel=tol)
        assert pop.curves["val/loss"][-1, i].item() == pytest.approx(ref["val/loss"], rel=tol)
        assert pop.curves["val/accuracy"][-1, i].item() == pytest.approx(ref["val/accuracy"], abs=1e-6)
    losses = sorted(ref["train/loss"] for ref in one_by_one)
    assert min(b / a - 1 for a, b in zip(losses, losses[1:])) > 100 * tol  # the members really differ


def test_population_strategy_tunes_both_heads_through_the_tune_stage(digits):
    original = digits.params()
    try:
        digits.update("quantum.tune.strategy", "population")
        digits.update("quantum.search", {"train.lr": {"low": 3.0e-3, "high": 3.0e-2, "log": True},
                                         "model.hidden": {"choices": [0, 16]}})  # fmt: skip
        digits.update("tune.n_trials", 6)
        run_stages(digits, "tune")
        best = json.loads((digits.root / "results/quantum/best_params.json").read_text())
        for variant in ("quanv", "raw"):
            assert sum(best[variant]["trials"].values()) == 6 and best[variant]["trials"]["complete"] >= 1
            tune = digits.runs("quantum", f"tags.stage = 'tune' and tags.variant = '{variant}'")[0]
            trials = digits.runs("quantum", f"tags.`mlflow.parentRunId` = '{tune.info.run_id}'")
            assert len(trials) == 6 and all(r.data.tags["tune.strategy"] == "population" for r in trials)
            assert {r.data.params["model.hidden"] for r in trials} <= {"0", "16"}
            assert all(0.1 < r.data.metrics["val/accuracy"] <= 1 for r in trials if r.data.tags["optuna.state"] == "COMPLETE")
    finally:
        digits.set_params(original)
