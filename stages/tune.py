"""DVC stage: python stages/tune.py <workload>"""
from accelbench.cli import main
from accelbench.pipeline import tune
from accelbench.tracking import record_failure

if __name__ == "__main__":
    main("tune", tune, on_failure=record_failure)
