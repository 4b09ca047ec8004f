"""DVC stage: python stages/eda.py <workload> (in a warm process where one serves: accelbench/preload.py)"""
from accelbench.preload import main

if __name__ == "__main__":
    main("eda")
