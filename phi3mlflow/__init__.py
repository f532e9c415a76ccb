"""Shared logic of the phi3-mlflow project: the built-in model, prompting, the ONNX wrapper,
metrics and step plumbing. The steps in ``steps/`` are thin command-line shells around it."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"
