r"""The low-resolution adaptation study: every recipe from one HR model, the same columns.

  python -m facemoe_jax.study --out runs/study                  # pre-train, then every recipe
  python -m facemoe_jax.study --out runs/study --seeds 3        # mean ± std over 3 seeds
  python -m facemoe_jax.study --out runs/study --pretrained runs/demo   # skip pre-training
  python -m facemoe_jax.study --suite lfw --out runs/lfw_study  # real faces (lfw.py)

What the seed papers (FaceMoE, PETALface, instance-relation distillation, recognizability) all
report: a model pre-trained on high-resolution (HR) faces is adapted to low-resolution (LR) data
by several methods; each row shows what the method gained at LR and what it kept at HR.

Modules, each importing only the ones above it:
  rows.py       a row (`Recipe`), its registration, the starts it may name;
  runner.py     what every suite shares: `Suite`, running (or reading back) rows in order, the
                table, results.json and the plot;
  synthetic.py  the synthetic suite: pre-trained here on the embedded identities (the default);
  lfw.py        the real-faces suites `lfw` and `lfw-validation`;
  cli.py        the command line and `SUITES`; __main__.py runs it.
This file re-exports nothing: importing one suite does not load the other.
"""
