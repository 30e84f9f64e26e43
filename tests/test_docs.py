"""The documentation keeps its shape: a README a newcomer reads in five minutes that opens
with the two commands CI runs, docs/ pages that each start with a command that works, links
that lead somewhere, no issue numbers, and workdirs that git ignores. Text only: no jax."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_BYTES = 12_000

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
ISSUE_REFS = (re.compile(r"\b(issue|stop) \d+", re.I), re.compile(r"#\d+\b"))
WORKDIR = re.compile(r"--workdir=([^\s`'\"\])]+)")
FIRST_COMMANDS = ("python", "pip", "bash", "tensorboard")


def ids(paths):
  return [p.relative_to(ROOT).as_posix() for p in paths]


def prose(text: str) -> str:
  """The text without fenced blocks or inline code, where brackets are code, not links."""
  return INLINE_CODE.sub("", FENCE.sub("", text))


def first_command(block: str) -> str:
  return next((line.strip() for line in block.splitlines()
               if line.strip() and not line.strip().startswith("#")), "")


def test_there_are_docs_pages():
  assert DOCS, "docs/*.md: no pages"


def test_readme_is_short():
  size = len(README.read_bytes())
  assert size < MAX_README_BYTES, (
      f"README.md is {size} bytes (limit {MAX_README_BYTES}): move the detail to docs/")


def test_readme_opens_with_the_demo_and_the_tests():
  text = README.read_text()
  blocks = list(FENCE.finditer(text))
  assert len(blocks) >= 2, "README.md: fewer than two code blocks"
  (demo, tests) = blocks[:2]
  assert demo.group(1).strip() == "bash" and "python -m grpo_jax.train" in demo.group(2), (
      f"README.md's first code block is not the demo command: {demo.group(0)!r}")
  assert tests.group(1).strip() == "bash" and "python -m pytest" in tests.group(2), (
      f"README.md's second code block is not the test command: {tests.group(0)!r}")
  first_section = text.find("\n## ")
  assert first_section == -1 or tests.end() < first_section, (
      "README.md: the two commands must come before the first section")


@pytest.mark.parametrize("page", DOCS, ids=ids(DOCS))
def test_docs_page_starts_with_a_command(page):
  lines = page.read_text().splitlines()
  assert lines and lines[0].startswith("# "), f"{page.name}: line 1 is not '# Title'"
  head_end = len("\n".join(lines[:10]))  # a block that opens within the first 10 lines
  block = next((m for m in FENCE.finditer(page.read_text())
                if m.group(1).strip() == "bash" and m.start() < head_end), None)
  assert block is not None, f"{page.name}: no ```bash block opens within its first 10 lines"
  command = first_command(block.group(2))
  assert command.startswith(FIRST_COMMANDS), (
      f"{page.name}: its first command {command!r} starts with none of {FIRST_COMMANDS}")


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_relative_links_lead_to_files(page):
  broken = []
  for target in LINK.findall(prose(page.read_text())):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
      continue  # a URL (https:, mailto:) or an anchor on the same page
    path = target.split("#", 1)[0]
    if not (page.parent / path).exists():
      broken.append(target)
  assert not broken, f"{page.name}: links to missing files: {broken}"


def test_readme_links_every_docs_page_and_each_links_back():
  readme_links = {t.split("#", 1)[0] for t in LINK.findall(prose(README.read_text()))}
  missing = [p.name for p in DOCS if f"docs/{p.name}" not in readme_links]
  assert not missing, f"README.md does not link these docs pages: {missing}"
  no_way_back = [p.name for p in DOCS
                 if "../README.md" not in {t.split("#", 1)[0]
                                           for t in LINK.findall(prose(p.read_text()))}]
  assert not no_way_back, f"docs pages without a link back to ../README.md: {no_way_back}"


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_no_issue_numbers(page):
  text = page.read_text()
  found = [m.group(0) for pattern in ISSUE_REFS for m in pattern.finditer(text)]
  assert not found, f"{page.name}: issue numbers have no place in the docs: {found}"


def git_works() -> bool:
  if shutil.which("git") is None:
    return False
  return subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT,
                        capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not git_works(), reason="needs git and a git checkout")
def test_workdirs_are_ignored_by_git():
  """A command copied from the docs must not leave untracked files in the checkout. A
  workdir is a directory, so `X/` counts too (a pattern such as `/output*/` matches a
  directory that does not exist yet only with its slash)."""

  def ignored(path: str) -> bool:
    return any(subprocess.run(["git", "check-ignore", "-q", p], cwd=ROOT,
                              check=False).returncode == 0
               for p in (path, path.rstrip("/") + "/"))

  workdirs = {w for page in PAGES for w in WORKDIR.findall(page.read_text())
              if "://" not in w}  # gs:// and other remote workdirs leave nothing here
  assert workdirs, "no --workdir=... in README.md or docs/"
  not_ignored = sorted(w for w in workdirs if not ignored(w))
  assert not not_ignored, f"workdirs in the docs that git does not ignore: {not_ignored}"
