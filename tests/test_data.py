"""Data plumbing: the demo task and tokenizer, dataset loading, prompt encoding, the stream."""

import json
import logging

import datasets
import numpy as np
import pandas as pd
import pytest
import transformers

from grpo_jax.data import (PromptStream, build_demo_tokenizer, demonstration, encode_prompts,
                           load_prompt_dataset, make_arithmetic_splits, reasoning_completion)
from grpo_jax.data import loading
from grpo_jax.errors import UserError

ROWS = [{"prompt": f"question {i}", "answer": str(i)} for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer():
  return build_demo_tokenizer()


# --- demo task ---------------------------------------------------------------------------

def test_demo_splits_are_disjoint_and_complete():
  train, evaluation = make_arithmetic_splits(seed=0, num_eval=256)
  assert len(evaluation) == 256 and len(train) == 4000 - 256
  assert not set(train["prompt"]) & set(evaluation["prompt"])
  assert len(set(train["prompt"]) | set(evaluation["prompt"])) == 4000
  assert set(train.column_names) == {"prompt", "answer"}


def test_demo_answers_are_left_to_right_results():
  train, _ = make_arithmetic_splits(seed=1, num_eval=10)
  for prompt, answer in zip(train["prompt"][:500], train["answer"][:500]):
    assert len(prompt) == 6 and prompt.endswith("=")
    assert answer == str(eval(prompt[:-1]))  # + and - are left-associative in Python too


def test_demo_split_depends_on_seed_only():
  first, second, other = (make_arithmetic_splits(seed=s, num_eval=50)[1]["prompt"]
                          for s in (3, 3, 4))
  assert first == second
  assert first != other


def test_demo_num_eval_out_of_range():
  with pytest.raises(UserError, match="num_eval=4000"):
    make_arithmetic_splits(num_eval=4000)


@pytest.mark.parametrize("prompt, expected", [
    ("3+4-2=", "3+4=7 7-2=5 #### 5"),
    ("1-5+2=", "1-5=-4 -4+2=-2 #### -2"),
    ("0-9-9=", "0-9=-9 -9-9=-18 #### -18"),
    ("9+9+9=", "9+9=18 18+9=27 #### 27"),
    ("5-5+0=", "5-5=0 0+0=0 #### 0"),
    ("2-7+9=", "2-7=-5 -5+9=4 #### 4"),
])
def test_reasoning_completion(prompt, expected):
  assert reasoning_completion(prompt) == expected


def test_reasoning_completion_rejects_other_prompts():
  with pytest.raises(UserError, match="'3\\*4='"):
    reasoning_completion("3*4=")


def test_demonstration_reasoning_share_and_guess_range():
  rng = np.random.default_rng(0)
  draws = [demonstration("3+4-2=", "5", rng, reasoning_prob=0.4) for _ in range(4000)]
  reasoned = [d for d in draws if d == "3+4=7 7-2=5 #### 5"]
  guesses = [d for d in draws if d != "3+4=7 7-2=5 #### 5"]
  assert abs(len(reasoned) / len(draws) - 0.4) < 0.03  # binomial std is 0.008
  assert all(g.startswith("#### ") for g in guesses)
  # Every value a+-b+-c can take, from 0-9-9 to 9+9+9, and nothing else.
  assert {int(g.removeprefix("#### ")) for g in guesses} == set(range(-18, 28))


def test_demonstration_extremes_and_determinism():
  rng = np.random.default_rng(0)
  assert demonstration("1+1+1=", "3", rng, reasoning_prob=1.0) == "1+1=2 2+1=3 #### 3"
  assert demonstration("1+1+1=", "3", rng, reasoning_prob=0.0).startswith("#### ")
  first = [demonstration("1+1+1=", "3", np.random.default_rng(7)) for _ in range(3)]
  assert len(set(first)) == 1


# --- demo tokenizer ----------------------------------------------------------------------

def test_demo_tokenizer_is_character_level(tokenizer):
  text = "".join(chr(c) for c in range(32, 127))
  ids = tokenizer(text)["input_ids"]
  assert ids == list(range(3, 98))  # one id per char, no special tokens added
  assert tokenizer.decode(ids, skip_special_tokens=True) == text
  assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
  assert tokenizer.padding_side == "left" and len(tokenizer) == 98


def test_demo_tokenizer_round_trip_keeps_spaces_and_drops_specials(tokenizer):
  text = "  3+4=7 7-2=5 #### 5"
  ids = tokenizer(text)["input_ids"]
  assert len(ids) == len(text)
  assert tokenizer.decode([0, 0] + ids + [1], skip_special_tokens=True) == text
  assert tokenizer.decode(ids + [1]) == text + "<eos>"


def test_demo_tokenizer_save_and_reload(tokenizer, tmp_path):
  tokenizer.save_pretrained(tmp_path)
  reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  text = "9-9=0 0+3=3 #### 3 ~!"
  assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
  assert reloaded.decode(reloaded(text)["input_ids"]) == text
  assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.padding_side) == (0, 1, "left")


# --- loading -----------------------------------------------------------------------------

def _write(tmp_path, name, rows=ROWS):
  path = tmp_path / name
  frame = pd.DataFrame(rows)
  if name.endswith(".jsonl"):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  elif name.endswith(".json"):
    path.write_text(json.dumps(rows))
  elif name.endswith(".parquet"):
    frame.to_parquet(path)
  else:
    frame.to_csv(path, index=False)
  return str(path)


@pytest.mark.parametrize("name, prefix", [
    ("data.jsonl", "jsonl:"), ("data.jsonl", "json:"), ("data.json", ""),
    ("data.parquet", "parquet:"), ("data.parquet", ""), ("data.csv", "csv:"), ("data.csv", ""),
])
def test_load_local_files(tmp_path, name, prefix):
  train, evaluation = load_prompt_dataset(prefix + _write(tmp_path, name))
  assert evaluation is None
  assert train["prompt"] == [r["prompt"] for r in ROWS]
  assert [str(a) for a in train["answer"]] == [r["answer"] for r in ROWS]


def test_load_with_held_out_eval(tmp_path):
  path = _write(tmp_path, "data.jsonl")
  train, evaluation = load_prompt_dataset(path, eval_size=3, seed=5)
  assert len(train) == 7 and len(evaluation) == 3
  held_out_and_kept = list(train["prompt"]) + list(evaluation["prompt"])
  assert sorted(held_out_and_kept) == sorted(r["prompt"] for r in ROWS)
  again = load_prompt_dataset(path, eval_size=3, seed=5)[1]
  assert again["prompt"] == evaluation["prompt"]
  with pytest.raises(UserError, match="eval_size=10 .* only 10 rows"):
    load_prompt_dataset(path, eval_size=10)


def test_load_custom_prompt_column(tmp_path):
  rows = [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]
  train, _ = load_prompt_dataset(_write(tmp_path, "q.jsonl", rows), "question")
  assert train["question"] == ["q1", "q2"]


def test_load_demo():
  train, evaluation = load_prompt_dataset("demo:arithmetic")
  assert len(train) == 4000 - 256 and len(evaluation) == 256
  assert not set(train["prompt"]) & set(evaluation["prompt"])
  with pytest.raises(UserError, match="demo:arithmetic"):
    load_prompt_dataset("demo:algebra")


def test_hub_spec_with_config_and_eval_split(monkeypatch):
  """The hub path's argument parsing and split choice, with load_dataset (the network) stubbed."""
  calls = []

  def fake_load_dataset(path, name=None):
    calls.append((path, name))
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"question": ["a", "b"]}),
        "test": datasets.Dataset.from_dict({"question": ["c"]})})

  monkeypatch.setattr(loading.datasets, "load_dataset", fake_load_dataset)
  train, evaluation = load_prompt_dataset("openai/gsm8k:main", "question", eval_split="test")
  assert calls == [("openai/gsm8k", "main")]
  assert train["question"] == ["a", "b"] and evaluation["question"] == ["c"]
  load_prompt_dataset("hf:gsm8k", "question")
  assert calls[-1] == ("gsm8k", None)
  with pytest.raises(UserError, match="no split 'validation' .*train, test"):
    load_prompt_dataset("openai/gsm8k", "question", eval_split="validation")


def test_load_errors(tmp_path):
  with pytest.raises(UserError, match="not found: .*missing.jsonl"):
    load_prompt_dataset(str(tmp_path / "missing.jsonl"))
  with pytest.raises(UserError, match="not found: .*missing.csv"):
    load_prompt_dataset("csv:" + str(tmp_path / "missing.csv"))
  with pytest.raises(UserError, match="unknown prefix 'jsnl'.*jsonl:.*parquet:.*csv:"):
    load_prompt_dataset("jsnl:" + _write(tmp_path, "data.jsonl"))
  with pytest.raises(UserError, match="no prompt column 'text'; columns: prompt, answer"):
    load_prompt_dataset(_write(tmp_path, "data.jsonl"), "text")
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(UserError, match="empty.jsonl is empty"):
    load_prompt_dataset(str(tmp_path / "empty.jsonl"))
  (tmp_path / "none.json").write_text("[]")
  with pytest.raises(UserError, match="none.json could not be read as json"):
    load_prompt_dataset(str(tmp_path / "none.json"))
  with pytest.raises(UserError, match="eval_size=-1"):
    load_prompt_dataset("demo:arithmetic", eval_size=-1)


# --- encode_prompts ----------------------------------------------------------------------

def test_encode_prompts_left_pads(tokenizer):
  ids, mask = encode_prompts(tokenizer, ["1+2=", "12+3=4"], 8)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 8)
  np.testing.assert_array_equal(mask, [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])
  assert ids[0, :4].tolist() == [tokenizer.pad_token_id] * 4
  assert tokenizer.decode(ids[0, 4:]) == "1+2=" and tokenizer.decode(ids[1, 2:]) == "12+3=4"


def test_encode_prompts_exact_length_fits(tokenizer):
  ids, mask = encode_prompts(tokenizer, ["1234"], 4)
  assert mask.tolist() == [[1, 1, 1, 1]] and tokenizer.decode(ids[0]) == "1234"


def test_encode_prompts_too_long_is_an_error(tokenizer):
  with pytest.raises(UserError, match="has 6 tokens.*max_prompt_length=4.*truncate_prompts=True"):
    encode_prompts(tokenizer, ["1+2=", "123456"], 4)


def test_encode_prompts_truncates_left_and_warns_once(tokenizer, caplog):
  with caplog.at_level(logging.WARNING):
    ids, mask = encode_prompts(tokenizer, ["abcdef", "xy", "123456789"], 4, truncate=True)
  assert [tokenizer.decode(row, skip_special_tokens=True) for row in ids] == ["cdef", "xy", "6789"]
  assert mask.sum(axis=1).tolist() == [4, 2, 4]
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "truncated 2 of 3 prompts" in warnings[0].getMessage()


def test_encode_prompts_empty_prompt_is_an_error(tokenizer):
  with pytest.raises(UserError, match="prompt 1 of the batch is empty"):
    encode_prompts(tokenizer, ["1+2=", ""], 8)


def test_encode_prompts_pads_with_eos_when_no_pad_token():
  tokenizer = build_demo_tokenizer()
  tokenizer.pad_token = None
  ids, _ = encode_prompts(tokenizer, ["1"], 3)
  assert ids[0, :2].tolist() == [tokenizer.eos_token_id] * 2


# --- PromptStream ------------------------------------------------------------------------

def _numbered(n):
  return datasets.Dataset.from_dict({"id": list(range(n)), "prompt": [f"p{i}" for i in range(n)]})


def _ids(stream, steps):
  return [stream.next_batch()["id"] for _ in range(steps)]


def test_stream_is_deterministic_and_seeded():
  data = _numbered(10)
  first = _ids(PromptStream(data, 4, seed=1), 6)
  assert first == _ids(PromptStream(data, 4, seed=1), 6)
  assert first != _ids(PromptStream(data, 4, seed=2), 6)


def test_stream_batches_have_all_columns():
  batch = PromptStream(_numbered(10), 3).next_batch()
  assert set(batch) == {"id", "prompt"}
  assert batch["prompt"] == [f"p{i}" for i in batch["id"]]


def test_stream_epochs_are_permutations_and_wrap():
  stream = PromptStream(_numbered(10), 4, seed=0)
  flat = sum(_ids(stream, 5), [])  # 20 prompts: exactly two epochs, batch 3 spans both
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
  assert flat[:10] != flat[10:]  # a new order each epoch
  assert stream.position == 20 and stream.epoch == 2


def test_stream_restore_continues_identically():
  data = _numbered(7)
  stream = PromptStream(data, 3, seed=4)
  _ids(stream, 5)
  state = stream.state()
  expected = _ids(stream, 4)
  resumed = PromptStream(data, 3, seed=4)
  resumed.restore(json.loads(json.dumps(state)))  # as it would come back from a checkpoint
  assert _ids(resumed, 4) == expected


def test_stream_multi_host_shares():
  data = _numbered(12)  # batches do not span epochs, so rows within a batch are distinct
  single = _ids(PromptStream(data, 4, seed=3), 6)
  shares = [_ids(PromptStream(data, 4, seed=3, process_index=i, process_count=2), 6)
            for i in range(2)]
  for step, batch in enumerate(single):
    first, second = shares[0][step], shares[1][step]
    assert len(first) == len(second) == 2
    assert first + second == batch  # contiguous shares whose union is the global batch
    assert not set(first) & set(second)


def test_stream_errors():
  with pytest.raises(UserError, match=r"prompts_per_step=3 must be divisible .*\(2\)"):
    PromptStream(_numbered(10), 3, process_count=2, process_index=0)
  with pytest.raises(UserError, match="process_index=2"):
    PromptStream(_numbered(10), 4, process_count=2, process_index=2)
  with pytest.raises(UserError, match="empty"):
    PromptStream(_numbered(0), 4)
