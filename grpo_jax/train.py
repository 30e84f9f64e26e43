"""`python -m grpo_jax.train`: the command line and `train_and_evaluate`.

  python -m grpo_jax.train [--config=configs/default.py] [--workdir=output] [--config.FIELD=VALUE ...]

Claims the workdir, builds and checks everything a run needs (`build.setup`: data,
rewards, model; the step compiled for its layout, the optimizer), restores the newest
checkpoint, and hands over to the loop (`loop.TrainLoop`: prompts -> sampling -> host
reward functions -> GRPO update, held-out greedy evaluation, CLU metric writers and Orbax
checkpoints). Re-running with the same workdir resumes from the latest checkpoint and
follows the same trajectory. What the user or the machine caused ends the process with one
line and its exit status (`train_command`).
"""

from __future__ import annotations

import contextlib
import logging
import sys

import datasets
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from grpo_jax import build, checkpoint, cli, grpo, hosts, metrics, preemption
from grpo_jax import config as config_lib
from grpo_jax import workdir as workdir_lib
from grpo_jax.checkpoint import orbax_noise
from grpo_jax.errors import UserError
from grpo_jax.loop import TrainLoop

log = logging.getLogger("grpo_jax")


def train_and_evaluate(config, workdir) -> dict[str, float]:
  """Runs GRPO per `config`, writing metrics and checkpoints under `workdir`.

  Returns the metrics of the last logged step (eval included) as floats. A SIGTERM or
  SIGINT ends it with `preemption.Preempted` after a checkpoint.
  """
  build.maybe_initialize_distributed(config.distributed)
  config_lib.validate(config)
  if not str(workdir).strip():
    raise UserError("--workdir is empty; pass the directory to write metrics and checkpoints "
                    "to (default: output)")
  workdir = workdir_lib.resolve(workdir)
  workdir_lib.check_writable(workdir)
  new_workdir = not workdir.exists()
  # One trainer per workdir, claimed before anything slow: a second one exits in seconds.
  with (workdir_lib.WorkdirLock(workdir, config.break_workdir_lock) if hosts.is_primary()
        else contextlib.nullcontext()) as lock:
    return _train_in(config, workdir, new_workdir, lock)


def _train_in(config, workdir, new_workdir: bool, lock) -> dict[str, float]:
  s = build.setup(config)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", build.fingerprint(s),
                                 max_to_keep=config.keep_checkpoints)
  logdir = workdir / "grpo_metrics"
  created = ([workdir] if new_workdir else []) + [
      p for p in (logdir, ckpt.directory) if not p.exists()]
  loop = writer = None
  stop = preemption.StopRequests(config.preemption_grace_seconds,
                                 lambda: "nothing was checkpointed yet: a rerun starts over")
  try:
    with stop:
      restored = build.restore_checkpoint(config, s, ckpt)
      start_step = restored.step if restored else 0
      # Before a writer opens the files: drop what a resumed run logs again (after the
      # checkpoint's step; everything when a run died before its first checkpoint).
      if hosts.is_primary() and (start_step or logdir.exists()):
        metrics.truncate_after(str(logdir), start_step if start_step else -1)
      writer = metrics.create_writer(str(logdir), enabled=hosts.is_primary())
      writer.write_hparams(config.to_dict())
      if build.uses_warmup(config) and (restored is None or restored.reference is None):
        s.init_params = build.run_warmup(config, s, workdir, writer if start_step == 0 else None)
      elif config.sft_steps and not build.uses_warmup(config):
        log.info("sft_steps=%d is the demo's warm-up (dataset %r only); dataset %r: skipped",
                 config.sft_steps, config_lib.DEMO_DATASET, config.dataset)
      tx, schedule = build.make_optimizer(config)
      step = grpo.GRPOStep(s.model_def, tx, schedule, s.grpo_config,
                           reference_def=s.reference_def)
      layout = build.planned_layout(config, step, s.model_config)
      loop = TrainLoop(config, s, layout, ckpt, writer, logdir)
      stop.resume_hint = loop.resume_hint
      loop.run(restored, stop)
    if not hosts.is_primary():
      return {}
    return {k: float(v) for k, v in metrics.read_metrics(str(logdir))[-1].items()
            if v is not None}
  except BaseException as e:
    if isinstance(e, Exception) and lock is not None and lock.lost():
      # deleted under us: whatever failed first (a metrics file, a checkpoint), this is why
      raise UserError(f"the workdir {workdir} was deleted during the run ({type(e).__name__} "
                      "while writing there); rerun to start over") from e
    if (loop is None or not loop.saved_any) and not isinstance(e, preemption.Preempted):
      ckpt.close()  # leave nothing half-written behind
      for path in reversed(created):
        if hosts.is_primary() and path.exists():
          path.rmtree()
    raise
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", "output", "Directory for metrics and checkpoints.")
  # config_flags already reads --config.FIELD overrides from sys.argv here.
  cli.errors_in_one_line(lambda: config_flags.DEFINE_config_file(
      "config", str(cli.DEFAULT_CONFIG), "Training config file.", lock_config=True))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Library INFO logs (Orbax, JAX) drown the progress line; ours stay at INFO.
  absl_logging.set_verbosity(absl_logging.WARNING)
  log.setLevel(logging.INFO)
  orbax_noise.install()  # a failed save is one line, not Orbax's tracebacks from its threads
  datasets.disable_progress_bars()
  config = FLAGS.config
  cli.errors_in_one_line(lambda: config.keys())  # a config file that failed to load says so here
  train_command(config, FLAGS.workdir)


def train_command(config, workdir) -> None:
  """`train_and_evaluate` as the command runs it: what the user or the machine caused (bad
  input, a signal, a full disk) ends the process with one line and its exit status
  (SystemExit: 1 with the line, 143 / 130 after a signal)."""
  try:
    result = train_and_evaluate(config, workdir)
  except UserError as e:
    sys.exit(f"grpo_jax: error: {e}")
  except preemption.Preempted as e:
    print(f"grpo_jax: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # before the loop's handlers were installed
    print("grpo_jax: interrupted (SIGINT) before training began", file=sys.stderr)
    sys.exit(130)
  except OSError as e:
    if e.errno not in checkpoint.WRITE_ERRNOS:  # the disk's fault: one line, naming the path
      raise
    sys.exit(f"grpo_jax: error: cannot write {e.filename or workdir}: {e.strerror}")
  summary = {k: round(v, 4) for k, v in result.items() if k.startswith("eval/")}
  print(f"done: {workdir}/grpo_metrics (curves.png, metrics.jsonl)"
        + (f" {summary}" if summary else ""))

def _deleted_workdir(workdir) -> str | None:
  """The local workdir's path when it no longer exists (deleted under a running trainer)."""
  if not str(workdir).strip() or "://" in str(workdir):
    return None
  resolved = workdir_lib.resolve(workdir)
  return None if resolved.exists() else str(resolved)


def run():
  define_flags()
  app.run(main, flags_parser=lambda argv: cli.errors_in_one_line(lambda: FLAGS(argv)))


if __name__ == "__main__":
  run()
