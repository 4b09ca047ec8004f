"""DVC stage: python stages/hardware.py"""
from accelbench.cli import main_global
from accelbench.data_stages import hardware

if __name__ == "__main__":
    main_global("hardware", hardware)
