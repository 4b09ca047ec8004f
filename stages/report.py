"""DVC stage: python stages/report.py -> reports/ (report.md, report.html, PNGs) from the MLflow store."""
from accelbench.cli import main_global
from accelbench.pipeline import report

if __name__ == "__main__":
    main_global("report", report)
