"""Training checkpoints that survive SIGKILL: written to a temp file and renamed, resumed only when
the params hash matches (different params start fresh)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # checkpoints/<workload>/<variant>/<framework>: the engine adds its own suffixes
    params_hash: str
    every_epochs: int

    def due(self, epochs_done: int, total: int) -> bool:
        return self.every_epochs > 0 and (epochs_done % self.every_epochs == 0 or epochs_done == total)


def params_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
