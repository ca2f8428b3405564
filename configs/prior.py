"""A miniature with a prior (issue 29; README "A miniature with a prior", whose design was written
before this file's first run): the demonstration (configs/demo.py) on a tiny model that first learns
digits broadly, as Qwen2.5-VL's pretraining gave the paper's model ImageNet's classes in many styles.

- pretrain (the stage this config adds): full SFT of the random tiny model on `builtin:prior[2048:]`,
  the train digits after the first 512 (so none of the cold start's [:256] or the scored [256:512]),
  each in four styles: plain, the rendition family, the corruption family, and another look (blur,
  inversion or a shrunk off-centre digit). No test digit is in it, and the OOD sets are the test
  digits, so every evaluation image is a digit the model never trained on.
- the cold start then starts from the pretrained model and is light, as the paper's is (1 epoch,
  a tenth of the pretraining's learning rate), on the same 256 plain digits as the demonstration's.
- everything after is the demonstration's: 10% wrong labels among the 256 scored prompts, 4 training
  seeds per method, every evaluation image, OOD curves on 128 per set, and Table 1's protocol; not
  the Fig. 5 sweep.

  python -m dcsft_jax.main --config=configs/prior.py
"""
from dcsft_jax import config_base


def get_config(arg=None):
  c = config_base.load_config_file("demo.py", beside=__file__).get_config(arg or "table1=true")
  c.workdir = "workdir/dcsft_prior"
  c.stages = "init,pretrain," + c.stages.split("init,", 1)[1]
  c.pretrain.data = "builtin:prior[2048:]"    # 926 train digits x 4 styles = 3,704 records
  c.pretrain.epochs = 3.0
  c.pretrain.learning_rate = 2e-3
  c.pretrain.warmup_ratio = 0.05
  c.pretrain.save_every = 1000
  c.cold_start.model = "pretrained_model"
  c.cold_start.epochs = 1.0
  c.cold_start.learning_rate = 2e-4
  return c
