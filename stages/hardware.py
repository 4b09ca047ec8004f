"""DVC stage: python stages/hardware.py -> results/hardware.json (CPU, RAM, GPUs, CUDA, versions)."""
from accelbench.cli import main_hardware

if __name__ == "__main__":
    main_hardware()
