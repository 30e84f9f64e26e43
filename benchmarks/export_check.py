"""Does the exported Hugging Face model answer as grpo_jax does? Greedy answers to held-out
problems from the run's final checkpoint (grpo_jax's own sampler) and from its export loaded
in `transformers` (`AutoModelForCausalLM`, torch, float32), token for token.

  python benchmarks/export_check.py --workdir output/real_model_learning [--problems 32]
      [--config configs/smollm2_arithmetic.py]

The run's own settings (the held-out problems, the chat template, the sampling limits) are
read back from its `grpo_metrics/hparams.json` over the recipe's config file. The export is
`<workdir>/hf_export` (`export_hf`). Prints how many of the answers are identical, and for
any that differ, where. Exit status 1 unless all are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from grpo_jax import build, checkpoint, evaluate, grpo, rollouts
from grpo_jax import config as config_lib
from grpo_jax.data import chat

HERE = os.path.dirname(os.path.abspath(__file__))


def run_config(path: str, workdir: str):
  """The recipe's config with the run's own top-level values (hparams.json) over it."""
  config = config_lib.from_file(path)
  with open(os.path.join(workdir, "grpo_metrics", "hparams.json")) as f:
    saved = json.load(f)
  for key, value in saved.items():
    if key in config and not isinstance(value, (dict, list)) and config[key] != value:
      try:
        config[key] = value
      except TypeError:  # a field whose type the JSON value does not keep: the recipe's
        pass
  config.allow_config_change = True  # reading the checkpoint, not continuing its run
  config_lib.validate(config)
  return config


def grpo_jax_answers(config, workdir: str, problems: int) -> tuple[list, list[list[int]]]:
  """(prompt rows, greedy completion ids up to and including EOS) from the newest
  checkpoint, decoded by the trainer's own sampler and layout."""
  s = build.setup(config)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), build.fingerprint(s))
  restored = build.restore_checkpoint(config, s, ckpt)
  if restored is None:
    sys.exit(f"no checkpoint in {workdir}/checkpoints")
  print(f"checkpoint of step {restored.step}")
  tx, schedule = build.make_optimizer(config)
  layout = build.planned_layout(
      config, grpo.GRPOStep(s.model_def, tx, schedule, s.grpo_config,
                            reference_def=s.reference_def), s.model_config)
  params = layout.place_params(restored.state.params)
  layout.note_resident(layout.init_state(params), None)
  rows = s.eval_data[:problems]
  host = rollouts.HostRollouts(s.tokenizer, s.reward_funcs, config, 1)
  ids, mask = host.encode(rows)
  sampler = rollouts.SingleTurnSampler(layout, evaluate.greedy_config(s.grpo_config.sampling))
  placed, _ = sampler(params, ids, mask, jax.random.key(0), rows)
  rollout = layout.to_host(placed)
  ckpt.close()
  return rows, rollouts.completion_id_lists(rollout.completion_ids, rollout.completion_mask)


def transformers_answers(config, export: str, rows, max_new_tokens: int) -> list[list[int]]:
  """Greedy completion ids (up to and including EOS) of the export in transformers."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  tokenizer = transformers.AutoTokenizer.from_pretrained(export)
  model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
  model.eval()
  eos = model.generation_config.eos_token_id
  eos = set(eos if isinstance(eos, list) else [eos])
  texts, special = chat.render_prompts(tokenizer, list(rows[config.prompt_column]),
                                       system_prompt=config.system_prompt,
                                       mode=config.chat_template)
  answers = []
  with torch.no_grad():
    for text in texts:
      ids = tokenizer(text, add_special_tokens=special, return_tensors="pt")
      out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id or min(eos))
      completion = out[0, ids["input_ids"].shape[1]:].tolist()
      cut = next((i for i, t in enumerate(completion) if t in eos), len(completion) - 1)
      answers.append(completion[:cut + 1])
  return answers


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--problems", type=int, default=32)
  p.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs",
                                                  "smollm2_arithmetic.py"))
  a = p.parse_args()
  config = run_config(a.config, a.workdir)
  if a.problems > config.eval_size:
    sys.exit(f"--problems {a.problems}: the run held out {config.eval_size}")
  rows, ours = grpo_jax_answers(config, os.path.abspath(a.workdir), a.problems)
  theirs = transformers_answers(config, os.path.join(a.workdir, "hf_export"), rows,
                                config.max_completion_length)
  same = [x == y for x, y in zip(ours, theirs)]
  print(f"{sum(same)} of {len(same)} greedy answers identical, token for token "
        f"(mean length {np.mean([len(x) for x in ours]):.1f} tokens)")
  for i, (x, y) in enumerate(zip(ours, theirs)):
    if x != y:
      at = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
      print(f"  problem {i}: first differs at token {at} (grpo_jax {x[at:at + 3]}, "
            f"transformers {y[at:at + 3]})")
  sys.exit(0 if all(same) else 1)


if __name__ == "__main__":
  main()
