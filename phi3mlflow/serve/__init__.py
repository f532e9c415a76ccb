"""The OpenAI-compatible server for any model this project logs, split as vLLM's
``entrypoints/openai`` is: ``protocol`` (the request checks and answer objects, shared with both
wrappers), ``backends`` (how each wrapper generates), ``tracing`` (``--trace``), ``app`` (routes,
SSE and errors) and ``cli`` (the one command: ``python -m phi3mlflow.serve``, the MLproject's
``serve`` entry point). Importing this package imports none of them: the pyfunc loads the protocol
alone."""
