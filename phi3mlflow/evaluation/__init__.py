"""Evaluation of the candidates on one question set, one module per concern: ``dataset`` (the
questions, checked), ``candidates`` (the URIs, resolved), ``callers`` (each model called as a user
would), ``answering`` (the loop over the questions), ``stats`` (paired comparisons), ``plot``, and
``runner`` (the evaluate step's work, logged to MLflow)."""
