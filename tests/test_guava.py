"""Guava: the generator, ImageFolder ingest/prepare with bad files, and the CNN in both frameworks
through the real stage scripts."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_failure_recorded, error_lines as conftest_error_lines
from accelbench.workloads.guava import CLASSES, channel_means, draw_guava, generate_images

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "guava"  # 6 images per class: PNG/JPEG, RGB/RGBA/L/CMYK/P


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def test_generator_same_seed_same_bytes(tmp_path):
    counts = generate_images(tmp_path / "a", 9, 48, seed=3)
    generate_images(tmp_path / "b", 9, 48, seed=3)
    generate_images(tmp_path / "c", 9, 48, seed=4)
    assert counts == {c: 3 for c in CLASSES}
    a = digests(tmp_path / "a")
    assert len(a) == 9 and a == digests(tmp_path / "b")
    assert set(a.values()).isdisjoint(digests(tmp_path / "c").values())
    with Image.open(tmp_path / "a" / "Anthracnose" / "0000.png") as im:
        assert im.size == (48, 48) and im.mode == "RGB"


def test_classes_are_not_solved_by_channel_means():
    """A linear model on each image's mean R, G, B stays near chance; the same linear model on six
    local-contrast features (share of pixels much darker/lighter than their neighbourhood) does
    not, so the classes differ in local marks, which a CNN can see, and not in colour.

    300 images, 5-fold CV: a chance-level classifier's accuracy has sd sqrt(1/3 * 2/3 / 300) = 0.027,
    so 0.45 is chance + 4.3 sd, and 0.50 is chance + 6 sd."""
    from scipy.ndimage import uniform_filter
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.arange(300) % 3
    x = np.stack([draw_guava(np.random.default_rng(s), CLASSES[c], 64) for s, c in zip(np.random.SeedSequence(7).spawn(300), y)])
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    means_acc = cross_val_score(linear, channel_means(x), y, cv=5).mean()
    gray = x.mean(axis=-1)
    local = gray - np.stack([uniform_filter(g, 7) for g in gray])
    marks = np.stack([(local < -t).mean((1, 2)) for t in (10, 20, 40)] + [(local > t).mean((1, 2)) for t in (10, 20, 40)], 1)
    marks_acc = cross_val_score(linear, np.sqrt(marks), y, cv=5).mean()
    assert means_acc < 0.45, means_acc
    assert marks_acc > 0.50 and marks_acc > means_acc + 0.1, (marks_acc, means_acc)


def test_torch_cnn_runs_bf16_channels_last_compiled_on_cpu():
    """precision=bf16 (CPU autocast), channels_last and torch.compile (the augmentation's warp ends its own
    graph) through the real engine; logits come back fp32."""
    import torch

    from accelbench.devices import Device, Runtime
    from accelbench.engines import get_engine
    from accelbench.io import Prepared
    from accelbench.workloads.guava import WORKLOAD, Params

    rng = np.random.default_rng(0)
    split = lambda n: {"x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "y": np.arange(n) % 3}  # noqa: E731
    prepared = Prepared({"train": split(12), "val": split(6), "test": split(6)},
                        {"inputs": ["x"], "classes": list(CLASSES), "image_size": 32,
                         "channel_mean": [120.0] * 3, "channel_std": [60.0] * 3})  # fmt: skip
    params = Params()
    runtime = Runtime(Device("cpu"), "torch", precision="bf16", channels_last=True, compile=True)
    engine = get_engine("torch")
    model = WORKLOAD.build_model("torch", params, prepared.meta)
    result = engine.fit(model, WORKLOAD.task(prepared.meta), prepared, params.train, runtime)
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.memory_format() == torch.channels_last
    assert np.isfinite(result.history[-1]["train/loss"]) and result.summary()["time/data_share"] >= 0
    logits = engine.predict(model, WORKLOAD.task(prepared.meta), prepared.splits["test"], ["x"], runtime)
    assert logits.shape == (6, 3) and logits.dtype == np.float32


def test_fast_paths_switch_on_by_params_and_compute_the_plain_cnn():
    """With both fast-path params off the model is the plain GuavaCNN; with them on, the fast subclass, which on
    the CPU computes the same logits and gradients from the same weights, training (augmented) and not."""
    import dataclasses

    import torch

    from accelbench.models.cnn import GuavaCNN
    from accelbench.models.cnn_fast import FastGuavaCNN
    from accelbench.workloads.guava import WORKLOAD, Params

    meta = {"classes": list(CLASSES), "channel_mean": [120.0] * 3, "channel_std": [60.0] * 3}
    plain_params = Params()
    plain_params = dataclasses.replace(plain_params, model=dataclasses.replace(
        plain_params.model, fused_augment=False, space_to_depth_stem=False))
    torch.manual_seed(0)
    fast = WORKLOAD.build_model("torch", Params(), meta)
    torch.manual_seed(0)
    plain = WORKLOAD.build_model("torch", plain_params, meta)
    assert type(fast) is FastGuavaCNN and type(plain) is GuavaCNN
    torch.testing.assert_close(fast.state_dict(), plain.state_dict(), rtol=0, atol=0)
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    for training in (True, False):
        outs = []
        for model in (fast, plain):
            model.train(training).zero_grad()
            torch.manual_seed(1)  # the same augmentation and dropout draws
            outs.append(model(x))
            outs[-1].square().sum().backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("channels", [3, 5, 8])
def test_padded_channels_are_the_same_conv(channels):
    """The stem's zero-padding to 8 input channels (what it does on CUDA in channels_last) changes no output
    and no gradient, and the gradient reaches the unpadded weights."""
    import torch
    from torch.nn import functional as F

    from accelbench.models.cnn_fast import pad_channels

    torch.manual_seed(0)
    x = torch.randn(4, channels, 17, 19, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, channels, 3, 3, dtype=torch.float64, requires_grad=True)
    xp, wp = pad_channels(x, w, 8)
    assert xp.shape[1] == wp.shape[1] == 8 and xp.is_contiguous(memory_format=torch.channels_last)
    plain, padded = F.conv2d(x, w, stride=2, padding=1), F.conv2d(xp, wp, stride=2, padding=1)
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-12)
    g = torch.randn_like(plain)
    grads = [torch.autograd.grad(out, (x, w), g) for out in (plain, padded)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(16, 16), (17, 23)])
def test_space_to_depth_is_the_same_conv(size):
    """The stem's 2x2 conv over 2x2 pixel blocks (what it runs on CUDA in channels_last) is the stride-2 3x3 conv:
    outputs and both gradients, on even and odd sides."""
    import torch
    from torch.nn import functional as F

    from accelbench.models.cnn_fast import pad_channels, space_to_depth
    from accelbench.workloads.guava import CLASSES, WORKLOAD, Params

    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    blocks, wb = space_to_depth(x, w)
    assert blocks.shape[1] == 12 and wb.shape == (8, 12, 2, 2)
    plain, by_blocks = F.conv2d(x, w, stride=2, padding=1), F.conv2d(blocks, wb)
    torch.testing.assert_close(by_blocks, plain, rtol=0, atol=1e-12)
    g = torch.randn_like(plain)
    for a, b in zip(*(torch.autograd.grad(out, (x, w), g) for out in (plain, by_blocks))):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    # the model's stem over blocks padded to 16 channels, as the CUDA kernel writes them
    meta = {"classes": list(CLASSES), "channel_mean": [120.0] * 3, "channel_std": [60.0] * 3}
    stem = WORKLOAD.build_model("torch", Params(), meta).double().features[0]
    with torch.no_grad():
        stem.weight.copy_(w)
        torch.testing.assert_close(stem.over_blocks(pad_channels(blocks, wb, 8)[0]), plain, rtol=0, atol=1e-12)


def test_augmentation_draws_per_image_and_keeps_the_range():
    """Each image gets its own map and factors; a switched-off part is skipped (its draw is None) and changes
    nothing; the jitter's contrast is around the mean of the image before the warp, and the result stays 0-255."""
    import torch

    from accelbench.models.augment import augment_reference, draw_augmentation
    from accelbench.workloads.guava import Augment

    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 20, 24)).float()
    theta, factors = draw_augmentation(6, Augment(), "cpu")
    assert theta.shape == (6, 2, 3) and factors.shape == (6, 3) and len(set(factors[:, 0].tolist())) == 6
    assert ((factors - 1).abs() <= 0.2).all()
    out = augment_reference(x, theta, factors)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255 and not torch.allclose(out, x)
    assert draw_augmentation(6, Augment(flip=False, rotation_deg=0.0, crop_min=1.0, jitter=0.0), "cpu") == (None, None)
    torch.testing.assert_close(augment_reference(x, None, None), x, rtol=0, atol=0)
    # contrast 0 (brightness, saturation 1) after zooming into a corner: every pixel becomes the mean of the
    # image as it came, not of the corner
    corner = torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.5, -0.5]]).repeat(6, 1, 1)
    flat = augment_reference(x, corner, torch.tensor([[1.0, 0.0, 1.0]]).repeat(6, 1))
    torch.testing.assert_close(flat, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x))


# ---------------------------------------------------------------- a `path` ImageFolder with bad files


def add_bad_files(folder: Path) -> dict[str, str]:
    """One of each file-level bad input: relative path -> the words its report line must hold."""
    good_jpeg = (folder / "fruit_fly" / "1_guava.jpg").read_bytes()
    (folder / "fruit_fly" / "corrupt.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])  # truncated mid-scan
    (folder / "healthy_guava" / "notes.txt").write_text("not a photo\n")
    Image.new("RGB", (16, 16), (90, 140, 60)).save(folder / "Anthracnose" / "tiny.png")
    return {
        "fruit_fly/corrupt.jpg": "truncated",
        "healthy_guava/notes.txt": "not an image file",
        "Anthracnose/tiny.png": "smaller than the crop",
    }


@pytest.fixture(scope="module")
def path_project(tmp_path_factory):
    """Ingest a fixture folder with three bad files; prepare fails at max_bad_fraction 0, then passes at 0.2."""
    from conftest import make_project

    base = tmp_path_factory.mktemp("guava_path")
    images = base / "images"
    shutil.copytree(FIXTURE, images)
    bad = add_bad_files(images)
    project = make_project(base / "project")
    project.update("guava.data.source", "path")
    project.update("guava.data.path", str(images))
    project.update("guava.prepare.max_bad_fraction", 0.0)
    project.bad = bad
    project.ingest = project.stage("ingest", "guava")
    project.strict = project.stage("prepare", "guava")
    project.strict_left = leftovers(project.root / "data" / "prepared" / "guava")
    project.update("guava.prepare.max_bad_fraction", 0.2)
    project.lenient = project.stage("prepare", "guava")
    return project


def error_lines(proc) -> list[str]:
    return conftest_error_lines(proc.stderr)


def leftovers(output: Path) -> list[Path]:
    """The stage's output folder and any temp folder beside it."""
    return [output] * output.exists() + sorted(output.parent.glob(f".{output.name}.*"))


def assert_failed_cleanly(proc, project, stage: str, left: list[Path], *words: str) -> None:
    """Non-zero exit, one error line holding `words`, no output left, and no MLflow run (data stages open no store)."""
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"accelbench {stage}: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert left == [], left
    assert_failure_recorded(project, "guava", stage, lines[0].split("error: ", 1)[1])


def test_ingest_copies_the_folder_with_its_bad_files(path_project):
    assert path_project.ingest.returncode == 0, path_project.ingest.stderr[-2000:]
    raw = path_project.root / "data" / "raw" / "guava"
    assert sorted(p.name for p in raw.iterdir() if p.is_dir()) == sorted(CLASSES)
    for rel in path_project.bad:
        assert (raw / rel).is_file(), rel  # raw is the original data; preparation judges it
    source = json.loads((raw / "source.json").read_text())
    assert source["rows"] == 21 and source["splits"] == ["whole"]


@pytest.mark.parametrize("bad_file", ["fruit_fly/corrupt.jpg", "healthy_guava/notes.txt", "Anthracnose/tiny.png"])
def test_bad_file_above_threshold_fails_prepare_naming_it(path_project, bad_file):
    """corrupt JPEG, non-image file, image too small for the crop: each named with its reason."""
    p = path_project
    line = error_lines(p.strict)
    assert_failed_cleanly(p.strict, p, "prepare", p.strict_left, "3 of 21 files", "max_bad_fraction=0.0", bad_file)
    reason = path_project.bad[bad_file]
    assert f"{bad_file}: " in line[0] and reason in line[0].split(f"{bad_file}: ", 1)[1].split(";")[0]


def test_bad_files_below_threshold_are_reported_and_skipped(path_project):
    assert path_project.lenient.returncode == 0, path_project.lenient.stderr[-2000:]
    prepared = path_project.root / "data" / "prepared" / "guava"
    meta = json.loads((prepared / "meta.json").read_text())
    reported = {b["file"]: b["reason"] for b in meta["skipped_files"]}
    assert set(reported) == set(path_project.bad)
    for rel, words in path_project.bad.items():
        assert words in reported[rel], (rel, reported[rel])
    splits = {s: np.load(prepared / f"{s}.npz") for s in ("train", "val", "test")}
    assert sum(len(z["y"]) for z in splits.values()) == 18  # the 18 good images, every mode decoded
    for z in splits.values():
        assert z["x"].dtype == np.uint8 and z["x"].shape[1:] == (32, 32, 3)
        assert sorted(np.unique(z["y"])) == [0, 1, 2]  # stratified: every class in every split
    train = splits["train"]["x"].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(meta["channel_mean"], train.mean(0), rtol=1e-9)  # from train only
    np.testing.assert_allclose(meta["channel_std"], train.std(0), rtol=1e-6)
    assert meta["classes"] == list(CLASSES) and meta["eval_batch_size"] >= 32


def test_torch_and_tensorflow_train_and_evaluate(path_project):
    """Both frameworks on the prepared folder: the task's metrics, per-class recall, the plots, timings."""
    project = path_project
    assert project.lenient.returncode == 0
    results = project.root / "results" / "guava"
    for framework in ("torch", "tensorflow"):
        project.update("framework", framework)
        proc = project.stage("train", "guava")
        assert proc.returncode == 0, proc.stderr[-3000:]
        scores = json.loads((results / "evaluate.json").read_text())
        cnn = scores["cnn"]
        for split in ("val", "test"):
            assert 0 <= cnn[f"{split}/accuracy"] <= 1 and 0 <= cnn[f"{split}/macro_f1"] <= 1
            for cls in CLASSES:
                assert 0 <= cnn[f"{split}/recall_{cls}"] <= 1
        assert 0 <= scores["channel_means_logreg"]["test/accuracy"] <= 1
        for png in ("cnn_confusion_test.png", "cnn_test_misclassified.png"):
            assert (results / "plots" / png).stat().st_size > 1000, png
        train = project.runs("guava", f"tags.stage = 'train' and tags.framework = '{framework}'")[0]
        assert train.info.status == "FINISHED"
        for key in ("throughput/samples_per_s", "time/epoch_s", "time/data_epoch_s", "time/data_share", "time/to_device_s"):
            assert key in train.data.metrics, (framework, key)


# ---------------------------------------------------------------- folder layouts that cannot work


def make_flat(folder: Path, classes=CLASSES) -> Path:
    for cls in classes:
        shutil.copytree(FIXTURE / cls, folder / cls)
    return folder


def make_split_mismatch(folder: Path) -> Path:
    make_flat(folder / "train")
    make_flat(folder / "val", CLASSES[:2])
    return folder


@pytest.fixture(scope="module")
def ingest_project(tmp_path_factory):
    from conftest import make_project

    return make_project(tmp_path_factory.mktemp("guava_ingest") / "project")


@pytest.mark.parametrize(
    "layout, words",
    [
        (lambda f: f, ["no class folders", "expected"]),
        (lambda f: make_flat(f, CLASSES[:1]), ["only class ['Anthracnose']", "at least 2 class folders"]),
        (make_split_mismatch, ["val: class folders", "differ from train/", "healthy_guava"]),
    ],
    ids=["empty_folder", "one_class", "splits_differ"],
)
def test_unusable_folder_fails_ingest(ingest_project, tmp_path, layout, words):
    project = ingest_project
    folder = tmp_path / "images"
    folder.mkdir()
    layout(folder)
    project.update("guava.data.source", "path")
    project.update("guava.data.path", str(folder))
    proc = project.stage("ingest", "guava")
    assert_failed_cleanly(proc, project, "ingest", leftovers(project.root / "data" / "raw" / "guava"), str(folder), *words)


def plant_augmented_copies(root: Path, photos: int, copies: int) -> None:
    """Kaggle's layout and names: <class>/<photo id>_unsharp_clahe_augmented_<n>.png, `copies` of each photo.
    Every copy of a photo carries the photo's own red level, so a split's images name their photos.
    Photo ids repeat across classes (id 1 is a fruit_fly and a healthy photo): the group is per class folder."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for photo in range(photos):
            red = 10 + 10 * photo
            for n in rng.choice(8, copies, replace=False):
                pixels = np.zeros((40, 40, 3), np.uint8)
                pixels[..., 0], pixels[..., 1], pixels[..., 2] = red, 80 * c, rng.integers(0, 255)
                Image.fromarray(pixels).save(root / cls / f"{photo}_unsharp_clahe_augmented_{n}.png")


def photos_in(split: dict[str, np.ndarray]) -> set[tuple[int, int]]:
    return {(int(y), int(x[0, 0, 0])) for x, y in zip(split["x"], split["y"])}


def test_augmented_copies_of_one_photo_stay_in_one_split(tmp_path, capsys):
    from accelbench.config import with_overrides
    from accelbench.io import write_json
    from accelbench.workloads.guava import GROUPING_RULE, WORKLOAD

    plant_augmented_copies(tmp_path / "images", photos=10, copies=4)
    params = with_overrides(WORKLOAD.Params(), {"data.source": "path", "data.path": str(tmp_path / "images"),
                                                "prepare.image_size": 32})  # fmt: skip
    raw = tmp_path / "raw"
    raw.mkdir()
    write_json(raw / "source.json", WORKLOAD.ingest(params, raw))
    for seed in (0, 1, 2):
        prepared = WORKLOAD.prepare(params, raw, seed)
        seen = {s: photos_in(prepared.splits[s]) for s in ("train", "val", "test")}
        assert seen["train"] & seen["test"] == set() and seen["train"] & seen["val"] == set()
        assert seen["val"] & seen["test"] == set()
        assert len(seen["train"] | seen["val"] | seen["test"]) == 30  # 3 classes x 10 photos
        for s in ("val", "test"):
            assert sorted({y for y, _ in seen[s]}) == [0, 1, 2]  # stratified by class, whole photos at a time
            assert len(prepared.splits[s]["y"]) % 4 == 0  # whole photos: 4 copies each
    grouping = prepared.meta["grouping"]
    assert grouping == {"rule": GROUPING_RULE, "files": 120, "groups": 30, "groups_across_splits": 0}
    out = capsys.readouterr().out
    assert "guava: 30 source photos by rule:" in out and "groups in more than one split: 0" in out


def test_names_without_a_photo_id_are_each_their_own_group(tmp_path):
    from accelbench.workloads.guava import source_groups

    paths = [Path("a/107_x_3.png"), Path("a/107_x_6.png"), Path("b/107_x_1.png"), Path("a/IMG_0001.jpg"), Path("a/IMG_0002.jpg")]
    groups = source_groups(paths, [0, 0, 1, 0, 0])
    assert groups[0] == groups[1]  # one photo, two augmentations
    assert len({groups[0], groups[2], groups[3], groups[4]}) == 4  # other class; unnamed files each alone
