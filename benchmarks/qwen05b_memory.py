"""Two GRPO steps on a Qwen2.5-0.5B-shaped model with random weights: does it fit, how fast?

  python benchmarks/qwen05b_memory.py [--workdir /tmp/qwen05b]

Builds the checkpoint with transformers (hidden 896, 24 layers, 14 heads / 2 kv heads,
intermediate 4864, vocab 151936, tied), saves it as a Hugging Face directory with a small
character tokenizer, then runs `python -m grpo_jax.train` on it for 2 steps (2 prompts,
G=4, 64 new tokens) under /usr/bin/time, and prints peak RSS and the step times.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

QWEN05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
               tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
               max_position_embeddings=32768)


def build_checkpoint(path: pathlib.Path) -> None:
  import torch
  import transformers

  from grpo_jax.data import demo
  if (path / "config.json").exists():
    return
  tokenizer = demo.build_demo_tokenizer()
  torch.manual_seed(0)
  config = transformers.Qwen2Config(**QWEN05B, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
  model = transformers.Qwen2ForCausalLM(config)
  print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/qwen05b")
  args = parser.parse_args()
  root = pathlib.Path(args.workdir)
  checkpoint = root / "checkpoint"
  build_checkpoint(checkpoint)
  data = root / "prompts.jsonl"
  data.write_text("\n".join(json.dumps({"prompt": p, "answer": "0"})
                            for p in ("What is 12 times 7?", "Name a prime above 20.")))
  run = root / "run"
  subprocess.run(["rm", "-rf", str(run)], check=True)
  cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "grpo_jax.train", f"--workdir={run}",
         f"--config.model_path={checkpoint}", f"--config.dataset=json:{data}",
         "--config.sft_steps=0", "--config.prompts_per_step=2", "--config.num_generations=4",
         "--config.max_completion_length=64", "--config.max_prompt_length=32",
         "--config.max_steps=2", "--config.eval_size=0", "--config.learning_rate=5e-7",
         "--config.checkpoint_every=1000"]
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    sys.exit(proc.stderr[-4000:])
  peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
  steps = [json.loads(l) for l in (run / "grpo_metrics" / "metrics.jsonl").open()]
  times = [r["step_time"] for r in steps if "step_time" in r]
  lengths = [r["completions/mean_length"] for r in steps if "completions/mean_length" in r]
  print(f"peak RSS {peak_kb / 2**20:.2f} GiB; step times {[round(t, 1) for t in times]} s "
        f"(first includes compilation); mean completion length {lengths}")


if __name__ == "__main__":
  main()
