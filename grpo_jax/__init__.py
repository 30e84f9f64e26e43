"""grpo_jax: GRPO post-training for language models in JAX / Flax NNX."""

import os as _os

# Start-up noise from libraries, silenced here because this runs before any grpo_jax module
# imports them (TensorFlow comes in through clu.metric_writers, transformers through the
# tokenizer and data code). setdefault: a value the user set wins.
#  - TF_ENABLE_ONEDNN_OPTS=0: TensorFlow only writes TensorBoard summaries here, so its
#    oneDNN kernels buy nothing; with them on (the default on CPUs with AVX-512/AMX) its
#    import prints "oneDNN custom operations are on ..." before its log level is applied.
#    JAX (XLA) does not read this variable.
#  - TRANSFORMERS_NO_ADVISORY_WARNINGS=1: drops only transformers' advisories, such as
#    "PyTorch was not found. Models won't be available ..." (we use its tokenizers, never
#    its models); its real warnings and errors still show.
# TF's C++ INFO lines are already hidden by jax, which sets TF_CPP_MIN_LOG_LEVEL=1 (if
# unset) on import; it is not set here so that `python -m grpo_jax.plan` can set its own.
for _key, _value in (("TF_ENABLE_ONEDNN_OPTS", "0"),
                     ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
  _os.environ.setdefault(_key, _value)
del _key, _value

__version__ = "0.1.0"
