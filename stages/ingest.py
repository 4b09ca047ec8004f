"""DVC stage: python stages/ingest.py <workload>"""
from accelbench.cli import main
from accelbench.pipeline import ingest

if __name__ == "__main__":
    main("ingest", ingest)
