"""DVC stage: python stages/benchmark.py <workload>"""
from accelbench.cli import main
from accelbench.pipeline import benchmark

if __name__ == "__main__":
    main("benchmark", benchmark)
