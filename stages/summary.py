"""DVC stage: python stages/summary.py <workload>"""
from accelbench.cli import main
from accelbench.summary import stage

if __name__ == "__main__":
    main("summary", stage)
