"""accelbench: how much does a GPU speed up deep-learning work, measured honestly."""
import os

# Set before any stage imports TensorFlow: keep its C++ start-up chatter out of stage logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
