"""``python -m phi3mlflow.serve <model URI>``: see phi3mlflow/serve/cli.py."""

from phi3mlflow.serve.cli import main

main()
