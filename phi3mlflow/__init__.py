"""Shared logic of the phi3-mlflow project: the built-in model, prompting, the ONNX wrapper,
metrics and step plumbing. The steps in ``steps/`` are thin command-line shells around it."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
DATA_DIR = PROJECT_ROOT / "data"
