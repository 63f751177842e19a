r"""Adaptable instance-relation distillation (Shi, Guo, Ge, arXiv 2409.02049), demo size.

A frozen HR teacher and an LR student of the same record: the teacher embeds the clean image,
the student the same image captured at low resolution (`data/augment.py` paired mode, the
capture `data.acquisition_*`: blur, a sensor of 8-16 px, noise, JPEG), and the student's loss is
its margin loss + instance_weight * mean(1 - cos(s_i, t_i)) + relation_weight *
mean_ij (cos(s_i, s_j) - cos(t_i, t_j))^2 over the global batch (`losses/distill.py`;
`config.distill` also offers the MSE instance form and the KL relation form). At test time
`--config.eval.adapt_bn=cumulative` (or `per_batch`) re-estimates the BatchNorm statistics on
each evaluated set (`train/adapt_bn.py`). The forms are our reading of the abstract (no
official code); see docs/distillation.md.

Defaults, self-contained (no download, nothing from another run): the teacher is the demo
ViT-MoE (configs/demo.py), trained first at HR into WORKDIR/teacher (700 steps; reused when the
run is started again); the student is the same architecture starting from the teacher's weights
(`distill.init_student`), trained 300 steps of 128 images on the 600 LR training identities of
the low-resolution study, with a fresh classifier: the study's `aird` row.

Run (on 2 CPU cores the teacher costs what the demo does, then the student about 3 minutes of
training and evaluation, as the study's rows):
  python -m facemoe_jax.main --config configs/aird.py --workdir runs/aird
With a teacher you already have (one of our workdirs or a PyTorch file, whose architecture
may differ from the student's):
  python -m facemoe_jax.main --config configs/aird.py --workdir runs/aird2 \
      --config.distill.teacher=runs/demo --config.init_from=runs/demo
"""

from configs import demo
from facemoe_jax import recipes


def get_config(arg=None):
    del arg
    config = demo.get_config()
    config.distill.update(pretrain_teacher="configs/demo.py", init_student=True)
    recipes.distillation(config, recipes.DISTILL_INSTANCE_WEIGHT, recipes.DISTILL_RELATION_WEIGHT)
    config.data.update(
        train="synthetic_lr_hr", synthetic_identities=600, synthetic_images_per_identity=8
    )
    config.train.update(num_steps=300)
    config.optimizer.update(learning_rate=5e-4, warmup_steps=30, end_learning_rate=0.0)
    config.checkpoint.update(every_steps=300, max_to_keep=1)
    config.eval.update(
        low_resolutions="8,12",
        low_resolution_sides="probe",
        synthetic_tinyface_identities=200,
        routing_map_faces=0,
    )
    return config
