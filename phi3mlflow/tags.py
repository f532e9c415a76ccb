"""The run and model-version tag names the steps write and read, in one place."""

# Every step run
ERROR = "phi3.error"  # a failed or cancelled run's cause, one line
EXIT = "phi3.exit"  # how a failed step's process ended: "killed by SIGKILL", "exited with status 1"
PROCESS = "phi3.process"  # "<host> <pid>" of the process a chain's run (main or a step) runs in
STDERR_TAIL = "phi3.stderr_tail"  # a failed step's last stderr lines, as main saw them
CACHE_KEY = "phi3.cache_key"  # what a step run was keyed on; a later run with the same key may reuse it
CODE_VERSION = "phi3.code_version"  # content hash of the project's code the run ran
INPUT_DIGEST = "phi3.input_digest."  # + parameter name: content digest of the file or folder it named
ENV_MANAGER = "phi3.env_manager"  # on main: the environment manager its children run with

# Wrapper runs (and, copied, the registered versions)
MODEL_URI = "model_uri"  # the run's logged model
WRAPPER = "wrapper"  # chat or onnx
PRECISION = "precision"  # fp32, int8, int4 or prebuilt (onnx)
SOURCE_MODEL = "source_model"  # the model parameter it was built from

# evaluate runs (and main)
BEST = "best"  # the best candidate by the selected metric, before the goals

# register runs (and main, which reads the registry again at its end)
REGISTERED_MODEL = "registered_model"
REGISTERED_VERSION = "registered_version"
WINNER = "winner"  # the best candidate that meets the goals (else the best): what register registers
ALIAS_MOVED = "alias_moved"  # true or false
ALIAS_REASON = "alias_reason"
CHAMPION_VERSION = "champion_version"  # the version the alias points to when the step or chain ended

# Registered versions
CANDIDATE = "candidate"  # the evaluation's candidate key it was registered as (chat, onnx_int4, ...)
SOURCE_EVAL_RUN = "source_eval_run"  # the evaluation a version was registered from (once per evaluation)
