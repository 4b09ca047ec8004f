"""DVC stage: python stages/eda.py <workload>"""
from accelbench.cli import main
from accelbench.data_stages import eda

if __name__ == "__main__":
    main("eda", eda)
