"""Imports go down: no cycle among the package's modules, and the stages that train nothing load no framework."""
from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

from conftest import HEAVY, REPO, make_project
from accelbench import stage_times
from accelbench.workloads import available

PACKAGE = REPO / "src" / "accelbench"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path) -> set[str]:
    """The project modules a module imports when it is imported: its top-level statements, not function bodies,
    `if TYPE_CHECKING:` blocks or the `if __name__ == "__main__":` entry point."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("accelbench"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from . import tuning` names a module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("accelbench"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in module_level_imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert "accelbench.pipeline" in graph["accelbench.tuning"] or "accelbench.runtime" in graph["accelbench.tuning"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


PROBE = """
import runpy, sys
for argv in {runs!r}:
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        assert not exc.code, (argv, exc.code)
print("LOADED " + " ".join(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))))
"""


def loaded_by(project, runs: list[list[str]]) -> set[str]:
    """The heavy packages loaded after running these stages one after another in one interpreter, as DVC
    would run each (one interpreter start instead of twenty keeps the test quick: a module any of them
    loaded stays in sys.modules, so the answer covers them all)."""
    out = project.run(sys.executable, "-c", PROBE.format(runs=runs, heavy=HEAVY), ACCELBENCH_PRELOAD="0").stdout  # here, not warm
    return set(out.rsplit("LOADED", 1)[1].split())


def test_stages_that_train_nothing_load_no_framework_and_no_store(tmp_path):
    project = make_project(tmp_path / "project")
    runs = [["stages/hardware.py"]] + [[f"stages/{stage}.py", name] for name in available() for stage in ("ingest", "eda", "prepare")]
    assert loaded_by(project, runs) == set()
    assert all((project.root / "data/prepared" / name / "meta.json").is_file() for name in available())
    # the probe does see a framework where one is loaded: the training stage that follows loads its own
    assert {"torch", "mlflow"} <= loaded_by(project, [["stages/train.py", "diabetes"]])


def test_tensorflow_stages_load_no_torch(tmp_path):
    """The Keras twins live apart from the torch models (models/keras_twins.py): a TensorFlow stage loads only
    the framework it trains with, here the series model, whose cuDNN question is asked without torch too."""
    project = make_project(tmp_path / "project", ["stock"])
    project.update("framework", "tensorflow")
    project.run(sys.executable, "-m", "dvc", "repro", "prepare@stock")
    loaded = loaded_by(project, [["stages/train.py", "stock"]])
    assert "tensorflow" in loaded and "torch" not in loaded, loaded
    assert (project.root / "models/stock/lstm/model.keras").is_file()


def test_stage_times_reports_each_stages_fixed_cost_from_a_real_run(tmp_path):
    project = make_project(tmp_path / "project", ["diabetes"])
    project.run(sys.executable, "-m", "dvc", "repro", "eda@diabetes", "tune@diabetes")
    out = project.run(sys.executable, "-m", "accelbench.stage_times").stdout
    rows = {r["stage"]: r for r in stage_times.latest(project.root / stage_times.LOG)}
    assert set(rows) == {"hardware", "ingest", "eda", "prepare", "tune"}
    for stage, row in rows.items():
        assert 0 < row["work_s"] < row["wall_s"], row  # imports at least are outside the work
        assert f"{stage}@diabetes" in out or stage == "hardware"
    assert rows["tune"]["work_s"] > 0.1  # two trials of four epochs and their runs, timed as work
    assert "5 stages:" in out and "fixed cost" in out
    log = (project.root / stage_times.LOG).read_text().splitlines()
    assert all(json.loads(line)["pid"] for line in log)


def test_the_readmes_layout_names_every_module():
    """A newcomer finds every module in the README's annotated layout: a new one must be added there."""
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("## ", 1)[0]
    missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" and p.name not in layout]
    assert missing == []


def test_a_process_age_lies_within_the_wall_time_its_parent_saw():
    """The wall time stage_times records starts at the process's creation: never before the parent started it
    (psutil's create_time, built on the whole-second boot time, read up to a second early)."""
    import subprocess
    import time

    code = "import time; time.sleep(0.5); from accelbench.stage_times import process_age_s; print(process_age_s())"
    t0 = time.monotonic()
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    tick = 1 / os.sysconf("SC_CLK_TCK")  # the start is known to a clock tick (10 ms): it may read up to one early
    assert 0.5 <= age <= time.monotonic() - t0 + tick
