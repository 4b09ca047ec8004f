"""DVC stage: python stages/prepare.py <workload>"""
from accelbench.cli import main
from accelbench.data_stages import prepare

if __name__ == "__main__":
    main("prepare", prepare)
