"""StopRequests in-process: a signal sets the flag; leaving the context disarms the grace
watchdog, so a caller that goes on is not killed `preemption_grace_seconds` later."""

import signal

from grpo_jax import preemption


def test_leaving_the_context_disarms_the_grace_watchdog():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopRequests(grace_seconds=600) as stop:
    signal.raise_signal(signal.SIGTERM)  # handled at once, in this (the main) thread
    watchdog = stop._watchdog
    assert stop.requested() and stop.signum == signal.SIGTERM
    assert watchdog is not None and watchdog.is_alive()
  watchdog.join(timeout=10)  # cancelled: its thread ends instead of calling os._exit
  assert not watchdog.is_alive() and stop._watchdog is None
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler is given back
