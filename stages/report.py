"""DVC stage: python stages/report.py"""
from accelbench.cli import main_global
from accelbench.report import build_for_project

if __name__ == "__main__":
    main_global("report", build_for_project)
