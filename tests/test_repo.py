"""The README's test command is exactly what CI runs."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
  readme = open(os.path.join(REPO, "README.md")).read()
  blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
  assert "python -m dcsft_jax.main --config=configs/dcsft.py" in blocks[0]
  assert blocks[1].strip() in open(os.path.join(REPO, ".ci", "run")).read()
