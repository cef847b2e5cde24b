"""Distillation methods, one file per conf/loss/<name>.yaml family, named as that YAML.

- base.py: `Step` (what a criterion sees), `Criterion`, `Combined` (a sum of criteria), `CELoss` (the label term
  every preset composes with, and the teacher phase's loss), `FeatureCriterion` (layer names, bind, adapters) and
  the shared helpers (weight checks, full precision, pooling to a common size).
- hooks.py: features by module name (`capture`, `probe_shapes`) and the models' default layers.
- kd.py (kd, kd_ls), dkd.py (dkd, dkd_ls), dist.py, fitnet.py, at.py, sp.py, pkt.py, rkd.py, cc.py, vid.py, nst.py,
  crd.py (crd; crd_kd composes it with kd.SoftTargets in YAML), reviewkd.py, and ab.py, fsp.py, ft.py, which declare
  an init stage (base.InitStage, trained by kd.stages before epoch 1).

Each method file holds its pure tensor function(s) first, then a small criterion class: its hyperparameters and a
forward(step) returning {term name: already-weighted term}. Adding a method is one file here, one
conf/loss/<name>.yaml whose `_target_` names the class, and one tests/methods/test_<name>.py; the config, sync and
teacher-cache tests discover the YAML by itself. Nothing is re-exported here: import from the method's file.
"""
