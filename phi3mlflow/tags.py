"""The run and version tag names the steps write and read, in one place."""

ERROR = "phi3.error"  # a failed or cancelled run's cause, one line
CACHE_KEY = "phi3.cache_key"  # what a step run was keyed on; a later run with the same key may reuse it
CODE_VERSION = "phi3.code_version"  # content hash of the project's code the run ran
INPUT_DIGEST = "phi3.input_digest."  # + parameter name: content digest of the file or folder it named
MODEL_URI = "model_uri"  # a wrapper run's logged model
CHAMPION_VERSION = "champion_version"  # on main: the version the alias points to when the chain ended
