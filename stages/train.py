"""DVC stage: python stages/train.py <workload>"""
from accelbench.cli import main
from accelbench.pipeline import train

if __name__ == "__main__":
    main("train", train)
