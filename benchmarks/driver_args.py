"""The command line every peer driver takes from compare.py (`run_peer` passes these)."""

from __future__ import annotations

import argparse


def workload_parser(description: str | None = None) -> argparse.ArgumentParser:
  """--model, --prompts, --out and the workload's GRPO settings; a driver adds its own."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--model", required=True, help="the workload's Hugging Face checkpoint")
  p.add_argument("--prompts", required=True,
                 help="JSONL file with a 'prompt' column (other columns go to the reward)")
  p.add_argument("--out", required=True, help="where the driver writes its JSON result")
  p.add_argument("--prompts-per-step", type=int, required=True)
  p.add_argument("--num-generations", type=int, required=True)
  p.add_argument("--max-completion-length", type=int, required=True)
  p.add_argument("--max-prompt-length", type=int, default=0,
                 help="prompt positions (0: every prompt has one length, which is used)")
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--beta", type=float, default=0.04)
  p.add_argument("--loss-type", choices=("grpo", "dapo"), default="grpo",
                 help="grpo: token mean per sequence, then sequence mean; dapo: token mean "
                      "over the whole batch")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--learning-rate", type=float, default=1e-6)
  p.add_argument("--reward", default="length_mod7",
                 help="the reward function's name in bench_reward (on PYTHONPATH)")
  p.add_argument("--seed", type=int, default=0)
  return p
