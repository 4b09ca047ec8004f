"""DVC stage: python stages/ingest.py <workload>"""
from accelbench.cli import main
from accelbench.data_stages import ingest

if __name__ == "__main__":
    main("ingest", ingest)
