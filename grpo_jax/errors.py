"""Errors caused by the user's input. `python -m grpo_jax.train` prints them as one line."""


class UserError(ValueError):
  """Bad input (config, data, reward functions, workdir): the message says what and where."""


class ConfigError(UserError):
  """A config field has a value outside what is allowed; the message names the field."""
