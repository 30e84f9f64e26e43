"""The GSM8K recipe end to end on a tiny random HF checkpoint: chat template, export."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from grpo_jax import metrics, train
from grpo_jax.data import demo
from test_train import ROOT, tiny_config

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROWS = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
     "clips in May. How many clips did she sell altogether?",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"),
    ("Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting. "
     "How much did she earn?", "12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10"),
    ("Betty needs $100 for a wallet and has half of it. Her parents give $15 and her "
     "grandparents twice as much. How much more does she need?", "#### 5"),
    ("James writes a 3-page letter to 2 friends twice a week. How many pages a year?",
     "3*2*2 = 12 pages a week.\n12*52 = <<12*52=624>>624\n#### 624"),
    ("A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts?",
     "#### 3"),
    ("Josh buys a house for $80,000 and puts in $50,000 in repairs, raising its value by "
     "150%. How much profit did he make?", "#### 70,000"),
]


@pytest.fixture(scope="module")
def tiny_instruct_model(tmp_path_factory):
  """A random Qwen2-layout checkpoint with a char tokenizer that has a chat template."""
  tokenizer = demo.build_demo_tokenizer()
  tokenizer.chat_template = CHATML
  torch.manual_seed(0)
  config = transformers.Qwen2Config(
      vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  path = tmp_path_factory.mktemp("tiny_qwen2")
  transformers.Qwen2ForCausalLM(config).save_pretrained(path)
  tokenizer.save_pretrained(path)
  data = path / "gsm8k.jsonl"
  data.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in ROWS))
  return path


def test_gsm8k_recipe_three_steps_from_the_command_line(tiny_instruct_model, tmp_path):
  workdir = tmp_path / "run"
  # A random model never answers right, so add a reward that varies (and hence a gradient).
  (tmp_path / "varied.py").write_text(
      "def by_length(prompts, completions, **kw):\n"
      "  return [float(len(c[0]['content'] if isinstance(c, list) else c) % 3) "
      "for c in completions]\n")
  args = ["--config=configs/gsm8k.py", f"--workdir={workdir}",
          f"--config.model_path={tiny_instruct_model}",
          f"--config.dataset=json:{tiny_instruct_model / 'gsm8k.jsonl'}",
          "--config.eval_split=", "--config.eval_size=2", "--config.max_steps=3",
          "--config.prompts_per_step=2", "--config.num_generations=2",
          "--config.max_completion_length=8", "--config.eval_every=3",
          "--config.max_prompt_length=384", "--config.export_hf=final_hf",
          f"--config.reward_funcs=correctness_reward,format_reward,{tmp_path}/varied.py:by_length"]
  env = {**os.environ, "XLA_FLAGS": ""}
  proc = subprocess.run([sys.executable, "-m", "grpo_jax.train", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logged = metrics.read_metrics(workdir / "grpo_metrics")
  assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
  for key in ("rewards/correctness_reward/mean", "rewards/format_reward/mean", "kl",
              "eval/accuracy"):
    assert any(key in r for r in logged), key
  samples = (workdir / "grpo_metrics" / "samples.jsonl").read_text()
  assert "Natalia" in samples or "Weng" in samples or "Betty" in samples or "James" in samples
  # The exported actor loads in transformers and differs from the starting weights.
  exported = transformers.AutoModelForCausalLM.from_pretrained(workdir / "final_hf")
  start = transformers.AutoModelForCausalLM.from_pretrained(tiny_instruct_model)
  assert type(exported).__name__ == "Qwen2ForCausalLM"
  with torch.no_grad():
    diffs = [float((a - b).abs().max())
             for a, b in zip(exported.parameters(), start.parameters())]
  assert 0 < max(diffs) < 1e-4  # moved, by 3 Adam steps of at most lr = 5e-7 each


def test_chat_message_prompts_reach_rewards_in_conversational_format(tiny_instruct_model,
                                                                     tmp_path, monkeypatch):
  rows = [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in ROWS[:4]]
  data = tmp_path / "chat.jsonl"
  data.write_text("\n".join(json.dumps(r) for r in rows))
  (tmp_path / "chat_rewards.py").write_text(
      "seen = []\n"
      "def record(prompts, completions, **kw):\n"
      "  seen.append((prompts[0], completions[0]))\n"
      "  return [0.0 for _ in completions]\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  config = tiny_config(model_path=str(tiny_instruct_model), dataset=f"json:{data}",
                       reward_funcs="chat_rewards:record", max_steps=1, max_prompt_length=200,
                       eval_every=5)
  train.train_and_evaluate(config, tmp_path / "run")
  import chat_rewards
  prompt, completion = chat_rewards.seen[0]
  assert prompt[0]["role"] == "user" and prompt[0]["content"] in [q for q, _ in ROWS]
  assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str)


def test_dapo_recipe_runs_with_its_overlong_punishment(tiny_instruct_model, tmp_path):
  """configs/dapo.py from the command line: dynamic sampling, the built-in
  soft_overlong_punishment built from the config (a fifth of 8 tokens: 1), in training and
  evaluation."""
  workdir = tmp_path / "run"
  (tmp_path / "varied.py").write_text(
      "def by_length(prompts, completions, **kw):\n"
      "  return [float(len(c[0]['content'] if isinstance(c, list) else c) % 3) "
      "for c in completions]\n")
  args = ["--config=configs/dapo.py", f"--workdir={workdir}",
          f"--config.model_path={tiny_instruct_model}",
          f"--config.dataset=json:{tiny_instruct_model / 'gsm8k.jsonl'}",
          "--config.eval_split=", "--config.eval_size=2", "--config.max_steps=1",
          "--config.prompts_per_step=2", "--config.num_generations=2",
          "--config.max_completion_length=8", "--config.eval_every=1",
          "--config.max_prompt_length=384",
          "--config.reward_funcs=correctness_reward,soft_overlong_punishment,"
          f"{tmp_path}/varied.py:by_length"]
  proc = subprocess.run([sys.executable, "-m", "grpo_jax.train", *args], cwd=ROOT,
                        env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logged = metrics.read_metrics(workdir / "grpo_metrics")
  step = next(r for r in logged if "loss" in r)
  evaluation = next(r for r in logged if "eval/accuracy" in r)
  # Completions of 8 tokens (the limit, EOS included) get -1, shorter ones 0.
  for value, mean_length in [
      (step["rewards/soft_overlong_punishment_reward/mean"], step["completions/mean_length"]),
      (evaluation["eval/rewards/soft_overlong_punishment_reward/mean"],
       evaluation["eval/completions/mean_length"])]:
    assert value == -1.0 if mean_length == 8 else -1.0 < value <= 0.0, (value, mean_length)
  assert step["dynamic_sampling/rounds"] >= 1 and "kl" not in step  # beta 0: no KL metric
