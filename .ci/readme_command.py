"""Prints the README's Nth ```bash block (1 = the main job, 2 = the tests), so CI runs the README's
commands exactly as written instead of copies of them."""
import os
import re
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def blocks(text: str) -> list[str]:
  return [b.strip() for b in re.findall(r"```bash\n(.*?)\n```", text, re.S)]


if __name__ == "__main__":
  n = int(sys.argv[1])
  with open(README, encoding="utf-8") as f:
    found = blocks(f.read())
  if len(found) < n:
    sys.exit(f"README.md has {len(found)} bash blocks; asked for block {n}")
  print(found[n - 1])
