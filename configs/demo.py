"""The demonstration: the default run (configs/dcsft.py) with error bars. Same model, data, cold start,
scoring, curation and training settings; what changes is only what the comparison needs:

- 4 training seeds per method (finetune and GRPO; the cold start, scores and curated files are shared),
- every image of the three evaluation sets (359 each, so 718 OOD images per model and seed),
- the OOD curves on 128 images per set,
- the Fig. 5 hard-ratio sweep (SFT-EM + 20% and + 50% of the hard bucket),
- Table 1's protocol (issue 29, added after the first run): easy, medium and hard each cut to the
  smallest bucket's size and trained 100 steps from the cold start.

  python -m dcsft_jax.main --config=configs/demo.py

On 2 CPU cores it takes about 30 minutes (README, "The demonstration"). The report gives each method's
accuracy as mean +- std over seeds and each OOD difference to SFT with its paired-bootstrap interval
over seeds and images. None of these settings was chosen by looking at the methods' results: the
evaluation sets were calibrated on the cold-started model alone, and this file was written before its
first run.
"""
from dcsft_jax import config_base


def get_config(arg=None):
  c = config_base.load_config_file("dcsft.py", beside=__file__).get_config(arg or "hard_sweep=true,table1=true")
  c.workdir = "workdir/dcsft_demo"
  c.seeds = 4
  c.evaluate.limit = 0            # every record of each set
  c.report.curve_limit = 128
  return c
