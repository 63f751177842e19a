"""Method set-ups shared by the config files and the low-resolution study: each changes a run
config in place, so `configs/*.py` and `study/` rows apply exactly the same recipe."""

from __future__ import annotations


def petalface(config, rank: int, head: bool, quality_mix: bool = True) -> None:
    """PETALface's adapters and training set-up (official train_iqa.py) on any encoder config:
    quality-mixed LoRA (or one plain LoRA, the ablation) on every attention qkv, optionally a
    plain adapter on the embedding projection; only the adapters and the classifier train;
    frozen BatchNorm statistics still update (`backbone.train()`); AdamW lr 5e-4 wd 0.1 with
    linear decay; gradient clip 5 on the backbone's (= the adapters') gradients; CosFace m=0.4
    over all classes; no router losses."""
    config.model.lora.update(
        rank=rank,
        scale=1.0,
        dropout=0.1,
        where="qkv",
        init="official",
        quality_mix=quality_mix,
        head=head,
    )
    config.train.update(trainable="lora,^classifier/", update_batch_stats=True)
    config.optimizer.update(
        name="adamw",
        learning_rate=5e-4,
        weight_decay=0.1,
        decay_power=1.0,
        end_learning_rate=0.0,
        grad_clip_norm=5.0,
        clip_scope="encoder",
    )
    config.loss.update(
        margin="combined", m1=1.0, m2=0.0, m3=0.4, sample_rate=1.0, z_coef=0.0, balance_coef=0.0
    )


# Adaptable instance-relation distillation (arXiv 2409.02049), our reading of the abstract. The
# weights were set once from the training losses, never from an evaluation: in the first steps
# from the demo HR model the margin loss is ~21, 1 - cos ~0.4 and the relation MSE ~0.05, so
# each weighted term starts near 2, a tenth of the margin loss.
DISTILL_INSTANCE_WEIGHT = 5.0
DISTILL_RELATION_WEIGHT = 40.0


def distillation(config, instance_weight: float, relation_weight: float, teacher: str = "") -> None:
    """The distillation training set-up on any encoder config: everything trains (no router
    losses, as full fine-tuning), the margin loss plus the weighted instance (1 - cos) and
    relation (MSE of the batch cosine matrices) terms against a frozen HR `teacher`. The student
    sees LR images of records whose clean version the teacher sees: the synthetic LR identities
    are read at full resolution (`synthetic_lr_hr`) and captured in the augmenter, fresh each
    epoch (`data.acquisition_prob=1`, the `acquisition_*` settings), paired with the render."""
    config.distill.update(
        teacher=teacher,
        instance_weight=instance_weight,
        relation_weight=relation_weight,
        instance_form="cosine",
        relation_form="mse",
    )
    paired_lr_data(config)
    config.loss.update(z_coef=0.0, balance_coef=0.0)


def paired_lr_data(config) -> None:
    """LR training images paired with their clean version (`batch["image_hr"]`): the synthetic
    LR identities read at full resolution and captured small in the augmenter, fresh each epoch;
    the clean image is the render. (Other sources keep their data; the capture applies.)"""
    if config.data.train == "synthetic_lr":
        config.data.train = "synthetic_lr_hr"
    config.data.acquisition_prob = 1.0


def recognizability(
    config, attention: bool = True, diversion: bool = True, quality_head: bool = True
) -> None:
    """The recognizability index (losses/recognizability.py) on any encoder config: the
    unrecognizable-identity centre and RI, the index diversion loss (`diversion=False`: weight
    0, the ablation), the perceptibility attention before the embedding head (`attention=False`:
    the ablation) and the quality head regressing RI; no router losses."""
    config.recognizability.enabled = True
    if not diversion:
        config.recognizability.diversion_weight = 0.0
    config.model.update(perceptibility_attention=attention, quality_head=quality_head)
    config.loss.update(z_coef=0.0, balance_coef=0.0)
