"""DVC stage: python stages/train.py <workload>"""
from accelbench.cli import main
from accelbench.pipeline import train
from accelbench.tracking import record_failure

if __name__ == "__main__":
    main("train", train, on_failure=record_failure)
