"""DVC stage: python stages/hardware.py -> results/hardware.json (CPU, RAM, GPUs, CUDA, versions)."""
from accelbench.cli import main_global
from accelbench.pipeline import hardware

if __name__ == "__main__":
    main_global("hardware", hardware)
