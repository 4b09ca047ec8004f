"""DVC stage: python stages/benchmark.py <workload>"""
from accelbench.benchmark import run
from accelbench.cli import main
from accelbench.tracking import record_failure

if __name__ == "__main__":
    main("benchmark", run, on_failure=record_failure)
