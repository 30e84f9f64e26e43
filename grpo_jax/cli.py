"""What the two commands (`python -m grpo_jax.train`, `python -m grpo_jax.plan`) share on
their command line: the default config file and flag mistakes reported in one line."""

from __future__ import annotations

import pathlib
import sys

from absl import flags

from grpo_jax import config as config_lib

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "default.py"


def errors_in_one_line(parse):
  """Runs absl / config_flags parsing; mistakes become one line instead of a traceback."""
  try:
    return parse()
  except AttributeError:  # config_flags: some --config.FIELD names no field
    sys.exit(f"grpo_jax: error: {config_lib.unknown_override(sys.argv[1:])}")
  except SyntaxError as e:  # the config file itself
    sys.exit(f"grpo_jax: error: config file {e.filename}, line {e.lineno}: {e.msg}: "
             f"{(e.text or '').strip()[:80]!r}")
  except (flags.Error, KeyError, ValueError, TypeError, OSError) as e:
    sys.exit(f"grpo_jax: error: bad command line: {' '.join(str(e).split())}")
