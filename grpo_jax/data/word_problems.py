"""Arithmetic word problems for pretrained chat models, generated offline from a seed.

`demo:word_problems` (the SmolLM2 recipe's data): short stories with one to three
operations, at three difficulty levels, each row holding the question, its integer answer
(`answer`, as GSM8K's "#### N") and its level. Problems are drawn from one seeded
generator and de-duplicated, so the train and held-out splits never share a question, and
the same seed gives the same splits on every machine.
"""

from __future__ import annotations

import random

import datasets

NAMES = ("Ann", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon",
         "Kira", "Liam", "Mia", "Noah", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma")
ITEMS = ("apples", "books", "coins", "stickers", "marbles", "pencils", "cookies", "cards",
         "shells", "stamps")
LEVELS = (1, 2, 3)
DEFAULT_NUM_EVAL = 256
DEFAULT_NUM_TRAIN = 2000


def _level1(rng: random.Random) -> tuple[str, int]:
  """One addition or subtraction with numbers up to 20."""
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  a, b = rng.randint(2, 20), rng.randint(2, 20)
  if rng.random() < 0.5:
    return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
  a, b = max(a, b), min(a, b)
  return f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b


def _level2(rng: random.Random) -> tuple[str, int]:
  """Two steps: a purchase and a gift, or a product."""
  name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
  if rng.random() < 0.5:
    a, b, c = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 5)
    c = min(c, a + b)
    return (f"{name} has {a} {item}, buys {b} more and then gives {c} to {other}. "
            f"How many {item} does {name} have now?"), a + b - c
  boxes, per_box = rng.randint(2, 9), rng.randint(2, 12)
  return (f"{name} buys {boxes} boxes of {item} with {per_box} {item} in each box. "
          f"How many {item} does {name} buy?"), boxes * per_box


def _level3(rng: random.Random) -> tuple[str, int]:
  """Three steps: boxes of items, some given away, some found."""
  name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
  boxes, per_box = rng.randint(2, 6), rng.randint(3, 10)
  given, found = rng.randint(1, boxes * per_box // 2), rng.randint(1, 15)
  return (f"{name} has {boxes} boxes with {per_box} {item} each, gives {given} {item} to "
          f"{other} and then finds {found} more. How many {item} does {name} have now?"), (
              boxes * per_box - given + found)


_MAKERS = {1: _level1, 2: _level2, 3: _level3}


def make_word_problem_splits(seed: int = 0, num_train: int = DEFAULT_NUM_TRAIN,
                             num_eval: int = DEFAULT_NUM_EVAL
                             ) -> tuple[datasets.Dataset, datasets.Dataset]:
  """(train, held-out) datasets with columns `prompt`, `answer` ("#### N"), `level`.

  Levels are drawn uniformly; a question already drawn is drawn again, so the splits are
  disjoint. The held-out split is drawn first, so its questions do not depend on num_train.
  """
  rng = random.Random(f"word_problems:{seed}")
  seen: set[str] = set()

  def draw(count: int) -> dict[str, list]:
    rows = {"prompt": [], "answer": [], "level": []}
    while len(rows["prompt"]) < count:
      level = rng.choice(LEVELS)
      question, answer = _MAKERS[level](rng)
      if question in seen:
        continue
      seen.add(question)
      rows["prompt"].append(question)
      rows["answer"].append(f"#### {answer}")
      rows["level"].append(level)
    return rows

  held_out = draw(num_eval)
  train = draw(num_train)
  return datasets.Dataset.from_dict(train), datasets.Dataset.from_dict(held_out)
