"""Sentiment workload: the real stages on the bundled tweets (torch) and on fixtures in the three file
formats (entity-level through TensorFlow), the split without leaks, the EDA artefacts, and each bad input."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from conftest import FIXTURES, assert_failure_recorded, error_lines, make_project

from accelbench.models.bilstm_fast import torch_model
from accelbench.workloads.sentiment import PAD, Model, Prepare, clean, tokenize

DATA = FIXTURES / "sentiment"
ENTITY = DATA / "twitter_entity.csv"


def bilstm(layers: int, dropout: float, fuse_directions: bool, narrow_head: bool):
    """A small BiLSTM: 500 tokens, 16-wide embeddings, 8 units per direction, 3 classes."""
    model = Model(embed_dim=16, hidden=8, layers=layers, dropout=dropout, fuse_directions=fuse_directions,
                  narrow_head=narrow_head)
    return torch_model(model, 500, 3, PAD)


def repro(project, *targets: str) -> None:
    project.run(sys.executable, "-m", "dvc", "repro", *targets)


def stages(project, *names: str) -> None:
    """The stage scripts one by one, where `dvc repro` would add stages the test does not need."""
    for name in names:
        proc = project.stage(name, "sentiment")
        assert proc.returncode == 0, proc.stderr[-3000:]


def new_project(tmp_path_factory, name: str):
    project = make_project(tmp_path_factory.mktemp(name) / "project")
    # tiny LSTM steps: with 2 threads on a busy 2-core box, OpenMP spin-waits made epochs 10-30x slower
    project.update("cpu_threads", 1)
    return project


def read_json(project, path: str):
    return json.loads((project.root / path).read_text())


def use_file(project, path: Path, **data) -> None:
    project.update("sentiment.data.source", "path")
    project.update("sentiment.data.path", str(path))
    for key, value in data.items():
        project.update(f"sentiment.data.{key}", value)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    project = new_project(tmp_path_factory, "sentiment-bundled")
    repro(project, "eda@sentiment", "train@sentiment")  # eda is a side branch: named on its own
    return project


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One project for the tests that only swap the input file (a fresh one costs seconds)."""
    return new_project(tmp_path_factory, "sentiment-scratch")


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    """One project for the bad files: none of them may leave an output behind."""
    return new_project(tmp_path_factory, "sentiment-failing")


@pytest.fixture(scope="module")
def entity_tf(tmp_path_factory):
    project = new_project(tmp_path_factory, "sentiment-entity")
    use_file(project, ENTITY)
    project.update("sentiment.framework", "tensorflow")
    stages(project, "ingest", "eda", "prepare", "train")  # tune is covered by the bundled run
    return project


def test_bundled_eda_holds_sane_numbers(bundled):
    eda = read_json(bundled, "results/sentiment/eda/eda.json")
    for png in ["class_balance", "tokens_per_tweet", "top_terms", "vader_compound"]:
        assert (bundled.root / f"results/sentiment/eda/{png}.png").stat().st_size > 5000, png
    assert eda["rows"] == 400 and eda["rows_in_source"] == 20761  # trump_tweets, sampled to max_rows
    assert sum(eda["class_counts"].values()) == 400
    assert eda["vader"]["counts_at_symmetric_thresholds"]["+-0.05"] == eda["class_counts"]  # labels follow the thresholds
    wide = eda["vader"]["counts_at_symmetric_thresholds"]["+-0.5"]
    assert wide["neutral"] > eda["class_counts"]["neutral"]  # a wider band makes more tweets neutral
    for stats in eda["tokens_per_tweet"].values():
        assert 3 < stats["mean"] < 60 and stats["max"] >= stats["p95"] >= stats["median"]
    assert eda["top_terms"]["positive"]["tokens"][0][0] in {"great", "thank", "thanks"}
    assert eda["duplicates"]["near_duplicate_rows"] >= eda["duplicates"]["exact_duplicate_rows"]
    train_run = bundled.runs("sentiment", "tags.stage = 'train'")[0]  # the EDA rides on the training run
    logged = set(bundled.artifacts(train_run.info.run_id, "eda"))
    assert "eda/vader_compound.png" in logged and "eda/eda.json" in logged
    assert train_run.data.tags["data.source"] == "bundled" and int(train_run.data.tags["data.rows"]) > 0


def test_bundled_bilstm_and_baseline_side_by_side(bundled):
    scores = read_json(bundled, "results/sentiment/evaluate.json")
    classes = read_json(bundled, "data/prepared/sentiment/meta.json")["classes"]
    assert classes == ["negative", "neutral", "positive"]
    for model in ["bilstm", "tfidf_logreg"]:
        m = scores[model]
        assert 0.0 <= m["test/macro_f1"] <= 1.0 and 0.0 < m["test/accuracy"] <= 1.0
        assert {f"test/f1_{c}" for c in classes} <= set(m)
        assert m["test/macro_f1"] == pytest.approx(np.mean([m[f"test/f1_{c}"] for c in classes]))
        assert (bundled.root / f"results/sentiment/plots/{model}_confusion_test.png").is_file()
    assert scores["tfidf_logreg"]["test/accuracy"] > 0.45  # VADER labels are lexical: TF-IDF must beat chance
    baseline = bundled.runs("sentiment", "tags.variant = 'tfidf_logreg'")
    assert len(baseline) == 1 and baseline[0].info.status == "FINISHED"
    assert baseline[0].data.metrics["test/macro_f1"] == pytest.approx(scores["tfidf_logreg"]["test/macro_f1"])


def test_bundled_train_run_logs_tokens_per_second_and_distant_supervision(bundled):
    run = bundled.runs("sentiment", "tags.stage = 'train'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["framework"] == "torch"
    assert run.data.tags["labels"].startswith("distant supervision: VADER compound <= -0.05")
    assert "reversed within each length" in run.data.tags["rnn"]
    with np.load(bundled.root / "data/prepared/sentiment/train.npz") as train:
        tokens_per_tweet = train["lengths"].mean()
        assert (train["lengths"] == (train["tokens"] != 0).sum(axis=1)).all()  # lengths count the non-pad ids
    m = run.data.metrics
    assert m["throughput/tokens_per_s"] == pytest.approx(m["throughput/samples_per_s"] * tokens_per_tweet, rel=1e-6)
    assert read_json(bundled, "results/sentiment/train.json")["bilstm"]["throughput/tokens_per_s"] > 0


def test_entity_file_runs_every_stage_in_tensorflow(entity_tf):
    source = read_json(entity_tf, "data/raw/sentiment/source.json")
    assert source["format"] == "entity" and source["rows"] == 210 and source["empty_texts"] == 1
    raw = pd.read_csv(entity_tf.root / "data/raw/sentiment/tweets.csv", dtype=str, keep_default_na=False)
    assert raw["text"].str.contains("\n").sum() == 1 and not raw["text"].str.contains("\r").any()  # CRLF rows
    eda = read_json(entity_tf, "results/sentiment/eda/eda.json")
    assert eda["entities"]["n_entities"] == 6 and (entity_tf.root / "results/sentiment/eda/sentiment_by_entity.png").is_file()
    assert eda["duplicates"]["ids"]["rows_per_id_mean"] > 2
    assert "vader" not in eda
    meta = read_json(entity_tf, "data/prepared/sentiment/meta.json")
    assert meta["classes"] == ["negative", "neutral", "positive", "irrelevant"]
    scores = read_json(entity_tf, "results/sentiment/evaluate.json")
    assert set(scores) == {"bilstm", "tfidf_logreg", "verdict"} and "test/f1_irrelevant" in scores["bilstm"]
    run = entity_tf.runs("sentiment", "tags.stage = 'train'")[0]
    assert run.data.tags["framework"] == "tensorflow" and "cuDNN-eligible" in run.data.tags["rnn"]
    assert run.data.tags["labels"].startswith("from the source file")
    assert run.data.metrics["throughput/tokens_per_s"] > 0


def test_no_tweet_id_or_text_in_two_splits(entity_tf):
    raw = pd.read_csv(entity_tf.root / "data/raw/sentiment/tweets.csv", dtype=str, keep_default_na=False)
    rows = read_json(entity_tf, "data/prepared/sentiment/meta.json")["raw_rows"]
    ids = {s: set(raw.loc[r, "id"]) for s, r in rows.items()}
    texts = {s: set(raw.loc[r, "text"].str.strip()) for s, r in rows.items()}
    assert max(raw.loc[rows["train"], "id"].value_counts()) > 1  # several variants per id reach train together
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not ids[a] & ids[b], f"tweet ids in {a} and {b}: {sorted(ids[a] & ids[b])[:5]}"
        assert not texts[a] & texts[b], f"texts in {a} and {b}: {sorted(texts[a] & texts[b])[:2]}"
    shared = raw[raw["text"] == raw.loc[10, "text"]]["id"]  # the fixture repeats one text under a second id
    assert shared.nunique() == 2 and len({s for s, i in ids.items() if set(shared) & i}) == 1


def test_vocabulary_is_fitted_on_train_only(entity_tf):
    raw = pd.read_csv(entity_tf.root / "data/raw/sentiment/tweets.csv", dtype=str, keep_default_na=False)
    meta = read_json(entity_tf, "data/prepared/sentiment/meta.json")
    seen = {s: {t for text in raw.loc[r, "text"] for t in tokenize(clean(text, Prepare()))} for s, r in meta["raw_rows"].items()}
    vocab = set(meta["vocab"][2:])
    assert vocab == seen["train"]  # min_freq 1 in tests: every train token, and nothing else
    assert (seen["val"] | seen["test"]) - seen["train"], "fixture should hold tokens unseen in training"


def test_folder_of_sentiment140_and_named_csv_ingests(scratch, tmp_path):
    folder = tmp_path / "tweets"
    folder.mkdir()
    for name in ["sentiment140.csv", "named_columns.csv"]:
        (folder / name).write_bytes((DATA / name).read_bytes())
    use_file(scratch, folder, text_column="tweet", label_column="sentiment")
    stages(scratch, "ingest")
    source = read_json(scratch, "data/raw/sentiment/source.json")
    assert source["format"] == "named+sentiment140" and source["rows"] == 300
    assert source["class_counts"] == {"positive": 110, "neutral": 95, "negative": 95}
    raw = pd.read_csv(scratch.root / "data/raw/sentiment/tweets.csv", dtype=str, keep_default_na=False)
    assert raw["text"].str.contains("café crème").sum() == 22  # Sentiment140 is latin-1
    assert raw["id"].str.startswith("14678").sum() == 150 and raw["id"].eq("").sum() == 150  # ids only in S140
    tokens = {t for text in raw["text"] for t in tokenize(clean(text, Prepare()))}
    assert {"<url>", "<user>", "café"} <= tokens and not any(t.startswith(("http", "@")) for t in tokens)


# ---------------------------------------------------------------- bad input: one line, non-zero exit, FAILED run

ENTITY_ROWS = "1,Amazon,Positive,love it\r\n2,Amazon,Negative,hate it\r\n"


def assert_fails_cleanly(project, stage: str, *expected: str, output: str = "data/raw/sentiment") -> None:
    proc = project.stage(stage, "sentiment")
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (project.root / output).exists()
    assert_failure_recorded(project, "sentiment", stage, expected[0])


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("unknown.csv", "date,open,close\n2020-01-01,1,2\n", ("unknown tweet file format", "Sentiment140")),
        ("no_label.csv", "text,mood\nlove it,happy\nhate it,sad\n", ("missing column 'label'", "label_column")),
        ("empty_texts.csv", "1,Amazon,Positive,\r\n2,Amazon,Negative,\r\n", ("all 2 texts are empty", "text")),
        ("bad_label.csv", ENTITY_ROWS + "3,Amazon,Happy,yay\r\n", ("'Happy' is not a known label", "sentiment")),
    ],
)
def test_bad_file_fails_ingest_with_one_clear_line(failing, tmp_path, name, content, expected):
    bad = tmp_path / name
    bad.write_text(content)
    use_file(failing, bad)
    assert_fails_cleanly(failing, "ingest", str(bad), *expected)


def test_split_left_with_one_class_fails_prepare(scratch, tmp_path):
    project = scratch  # holds raw data from the folder test, but no prepared data
    # every negative tweet shares one id, so only one split can hold negatives; the others keep one class
    rows = [f"{i},Amazon,Positive,love this great thing number {i}" for i in range(40)]
    rows += [f"99,Amazon,Negative,awful broken thing take {i}" for i in range(6)]
    bad = tmp_path / "one_negative_id.csv"
    bad.write_text("\r\n".join(rows) + "\r\n")
    use_file(project, bad)
    assert project.stage("ingest", "sentiment").returncode == 0
    assert_fails_cleanly(project, "prepare", "split holds only class 'positive'", "field 'label'",
                         output="data/prepared/sentiment")  # fmt: skip


def test_line_breaks_inside_tweets_survive_ingest(scratch, tmp_path):
    """trump_tweets holds tweets with a bare carriage return. Written unquoted, such a tweet came back from
    tweets.csv as two records (pandas 3.1) or stopped eda (the GPU host's pandas); read from a file, the CR was
    dropped and the words either side of it joined. Every line break is now a newline, every text quoted, and a file that reads
    back with another count than ingest wrote stops the stage that reads it."""
    from accelbench.workloads.sentiment import read_raw

    texts = ["first line\rsecond line", "a crlf\r\ninside", "a lf\ninside", "plain words", "two\r\rcrs"]
    path = tmp_path / "named.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows([("text", "label")] + [(t, lab) for t in texts for lab in ("positive", "negative")])
    use_file(scratch, path, text_column="text", label_column="label")
    proc = scratch.stage("ingest", "sentiment")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sentiment: 6 bare carriage return(s) inside texts read as line breaks" in proc.stdout
    stages(scratch, "eda")
    raw_dir = scratch.root / "data/raw/sentiment"
    newlines = ["first line\nsecond line", "a crlf\ninside", "a lf\ninside", "plain words", "two\n\ncrs"]
    assert read_raw(raw_dir)["text"].tolist() == [t for t in newlines for _ in range(2)]

    raw = raw_dir / "tweets.csv"
    raw.write_text(raw.read_text().replace('"plain words"', "plain\rwords"))  # as ingest wrote such a tweet before
    proc = scratch.stage("eda", "sentiment")
    lines = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(raw) in lines[0] and "run ingest@sentiment again" in lines[0], lines[0]


def _load_packed(model, ref: torch.nn.LSTM) -> None:
    """A packed bidirectional nn.LSTM's weights into the model: each layer's two LSTMs, or the two blocks of the
    fused LSTM (rows: gate, direction, unit; columns: direction, input)."""
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                fwd, bwd = (getattr(ref, f"{name}_l{i}{suffix}") for suffix in ("", "_reverse"))
                if hasattr(layer, "fwd"):
                    getattr(layer.fwd, f"{name}_l0").copy_(fwd)
                    getattr(layer.bwd, f"{name}_l0").copy_(bwd)
                    continue
                w = getattr(layer.lstm, f"{name}_l0")
                w.zero_()
                if w.dim() == 1:
                    w.view(4, 2, -1)[:, 0], w.view(4, 2, -1)[:, 1] = fwd.view(4, -1), bwd.view(4, -1)
                else:
                    blocks, units = w.view(4, 2, ref.hidden_size, 2, -1), (4, ref.hidden_size, -1)
                    blocks[:, 0, :, 0], blocks[:, 1, :, 1] = fwd.view(units), bwd.view(units)


def _tweets(n_tokens: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([1, n_tokens, 7, 12, n_tokens - 1, 2])
    tokens = torch.randint(2, 500, (len(lengths), n_tokens))
    tokens[torch.arange(n_tokens) >= lengths[:, None]] = 0
    return tokens, lengths


@pytest.mark.parametrize("fuse, fast", [(False, False), (False, True), (True, True)], ids=["plain", "two_lstms", "fused"])
@pytest.mark.parametrize("layers", [1, 3])
def test_bilstm_is_a_packed_bidirectional_lstm(layers, fuse, fast):
    """The padded model (backward direction reversed within each length), plain and with its fast paths, against
    torch's packed BiLSTM with the same weights: padding must reach no state that is used. Tolerance: float32
    rounding of the same products."""
    from accelbench.models.bilstm import BiLSTM
    from accelbench.models.bilstm_fast import FastBiLSTM

    torch.manual_seed(0)
    model = bilstm(layers, 0.3, fuse_directions=fuse, narrow_head=fast).eval()
    assert type(model) is (FastBiLSTM if fast else BiLSTM)
    ref = torch.nn.LSTM(16, 8, num_layers=layers, batch_first=True, bidirectional=True)
    _load_packed(model, ref)
    tokens, lengths = _tweets()
    _, (h, _) = ref(pack_padded_sequence(model.embed(tokens), lengths, batch_first=True, enforce_sorted=False))
    ours = model.features(tokens, lengths)
    torch.testing.assert_close(ours, torch.cat([h[-2], h[-1]], dim=1), rtol=0, atol=1e-6)
    tokens[0, 5:] = 7  # what lies past a tweet's length changes nothing
    torch.testing.assert_close(model.features(tokens, lengths), ours, rtol=0, atol=0)
    model.features(tokens, lengths).sum().backward()  # the embedding's gradient: nothing flows into padding
    grad = model.embed.weight.grad
    assert grad[0].abs().max() == 0 and (grad[tokens[0, 0]].abs() > 0).any()


@pytest.mark.parametrize("layers", [1, 2])
def test_fused_directions_train_as_two_lstms(layers):
    """AdamW with weight decay on the block-diagonal LSTM: no weight may come to join the directions, so after
    some steps it computes what two separate LSTMs trained from the same weights compute."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(16, 8, num_layers=layers, batch_first=True, bidirectional=True)
    models = {fuse: bilstm(layers, 0.0, fuse_directions=fuse, narrow_head=True)
              for fuse in (False, True)}
    tokens, lengths = _tweets()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for model in models.values():
        _load_packed(model, ref)
        model.embed.load_state_dict(models[False].embed.state_dict())
        model.head.load_state_dict(models[False].head.state_dict())
    for model in models.values():
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(tokens, lengths), y).backward()
            opt.step()
    fused = models[True].layers[0].lstm
    assert fused.weight_hh_l0[:8, 8:16].abs().max() == 0 < fused.weight_hh_l0[:8, :8].abs().max()  # i gate: fwd units
    trained = models[False].features(tokens, lengths)
    torch.testing.assert_close(models[True].features(tokens, lengths), trained, rtol=0, atol=1e-5)
    _load_packed(models[False], ref)  # the steps moved the weights
    assert (models[False].features(tokens, lengths) - trained).abs().max() > 1e-2


def test_narrow_head_is_the_dense_head():
    """The head as a multiply and sum: the same init, state, outputs and gradients as nn.Linear's matmul."""
    models = []
    for narrow in (False, True):
        torch.manual_seed(0)
        models.append(bilstm(1, 0.0, fuse_directions=True, narrow_head=narrow))
    dense, narrow = models
    assert type(narrow.head) is not torch.nn.Linear
    torch.testing.assert_close(narrow.state_dict(), dense.state_dict(), rtol=0, atol=0)
    tokens, lengths = _tweets()
    for model in models:
        torch.nn.functional.cross_entropy(model(tokens, lengths), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    torch.testing.assert_close(narrow(tokens, lengths), dense(tokens, lengths), rtol=0, atol=1e-6)
    for (name, a), b in zip(narrow.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)


def test_compile_traces_all_but_the_lstms():
    """dynamo does not trace into nn.LSTM, and it cannot resume a frame inside a loop after that break: the work
    around the layers must sit where it compiles, else it runs op by op under compile=true. The one exception,
    on the CPU only: the embedding lookup."""
    model = bilstm(2, 0.3, fuse_directions=True, narrow_head=True)
    tokens, lengths = _tweets()
    torch.compiler.reset()
    explained = torch._dynamo.explain(model)(tokens, lengths)
    traced = {getattr(op, "__name__", str(op)) for ops in explained.ops_per_graph for op in ops}
    assert {"where", "stack", "cat", "dropout"} <= traced  # the first pair, between the layers, the head
    reasons = [b.reason for b in explained.break_reasons]  # explain lists each kind of break once
    assert reasons and all("LSTM" in r or "disable" in r for r in reasons)


# ---------------------------------------------------------------- encodings and Sentiment140's header

# What Excel on Windows writes: cp1252, where ’ is 0x92 and € 0x80, bytes that are not UTF-8
CP1252_ROWS = (
    "2401,Borderlands,Positive,I’m loving the new café map\r\n"
    "2402,Amazon,Negative,paid 50€ and it broke — awful\r\n"
    "2403,Xbox(Xseries),Neutral,the update is out today\r\n"
)


def test_cp1252_file_stops_ingest_naming_its_first_bad_line(failing, tmp_path):
    bad = tmp_path / "twitter_validation.csv"
    bad.write_bytes(CP1252_ROWS.encode("cp1252"))
    use_file(failing, bad)
    assert_fails_cleanly(failing, "ingest", str(bad), "line 1 is not valid utf-8", "byte 0x92", "sentiment.data.encoding=cp1252")


def test_declared_cp1252_decodes_every_character(tmp_path):
    from accelbench.workloads.sentiment import read_tweets

    path = tmp_path / "twitter_validation.csv"
    path.write_bytes(CP1252_ROWS.encode("cp1252"))
    df, fmt, encoding = read_tweets(path, encoding="cp1252")
    assert (fmt, encoding) == ("entity", "cp1252")
    assert df["text"].tolist() == [line.split(",", 3)[3] for line in CP1252_ROWS.splitlines()]
    assert not df["text"].str.contains("\ufffd").any()


def test_cp1252_undefined_byte_fails_even_when_declared(tmp_path):
    from accelbench.errors import DataError
    from accelbench.workloads.sentiment import read_tweets

    path = tmp_path / "tweets.csv"
    path.write_bytes(CP1252_ROWS.encode("cp1252") + b"2404,Amazon,Positive,odd \x81 byte\r\n")
    with pytest.raises(DataError, match=r"line 4 is not valid cp1252 \(declared by sentiment.data.encoding\): byte 0x81"):
        read_tweets(path, encoding="cp1252")


def test_sentiment140_with_its_header_reads_like_without(tmp_path):
    from accelbench.workloads.sentiment import read_tweets

    headerless = DATA / "sentiment140.csv"
    with_header = tmp_path / "sentiment140_header.csv"
    with_header.write_bytes(b'"target","ids","date","flag","user","text"\r\n' + headerless.read_bytes())
    plain, fmt, encoding = read_tweets(headerless)
    headed, fmt_h, encoding_h = read_tweets(with_header)
    assert (fmt, fmt_h, encoding, encoding_h) == ("sentiment140", "sentiment140-header", "latin-1", "latin-1")
    pd.testing.assert_frame_equal(plain, headed)
    assert set(headed["label"]) == {"negative", "neutral", "positive"}


def test_a_losing_verdict_names_the_sample_ingest_kept_and_none_where_nothing_was_sampled(tmp_path):
    """The note reads what ingest kept (source.json, in the prepared meta), not max_rows: 4,000 rows of the bundled
    20,761 are a sample; a 210-row file read whole under max_rows 4000 is not."""
    import yaml

    from conftest import REPO
    from accelbench.project import load_config
    from accelbench.workloads import get_workload

    quick = {**yaml.safe_load((REPO / "params.yaml").read_text()), "study": "quick"}  # whatever study the checkout is set to
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(quick))
    wl, params = get_workload("sentiment"), load_config(tmp_path / "params.yaml").params("sentiment")
    sampled = wl.verdict_note(params, {"source": {"rows": 4000, "rows_in_source": 20761}}, False, -0.02, 583)
    assert "trained on a seeded sample of 4,000 of 20,761 rows" in sampled and "-S study=gpu" in sampled
    whole = wl.verdict_note(params, {"source": {"rows": 210, "rows_in_source": 210}}, False, -0.02, 42)
    assert params.data.max_rows == 4000 and "sample" not in whole
