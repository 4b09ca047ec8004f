"""DVC stage: python stages/evaluate.py <workload>"""
from accelbench.cli import main
from accelbench.pipeline import evaluate

if __name__ == "__main__":
    main("evaluate", evaluate)
