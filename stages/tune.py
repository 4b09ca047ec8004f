"""DVC stage: python stages/tune.py <workload>"""
from accelbench.cli import main
from accelbench.pipeline import tune

if __name__ == "__main__":
    main("tune", tune)
