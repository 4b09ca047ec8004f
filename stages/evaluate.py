"""DVC stage: python stages/evaluate.py <workload>"""
from accelbench.cli import main
from accelbench.pipeline import evaluate
from accelbench.tracking import record_failure

if __name__ == "__main__":
    main("evaluate", evaluate, on_failure=record_failure)
