r"""The official FaceMoE Swin-MoE (`swin_120_topk_moe_loss(num_experts=3, k=2)`) and its recipes.

Model: 120x120 RGB input, patch 6 (20x20 tokens), widths 384/768/1536, depths 2/18/2, heads
8/16/16, window 5; every block's MLP is an MoE with 3 GELU experts, top-2 on the raw router
logits, combined with the raw logits (no softmax), every token processed; head BatchNorm ->
Dropout(0.25) -> Linear(38400 -> 512) -> BatchNorm. 464M parameters; exports load with
`strict=True` into the official PyTorch model (docs/export.md).
`--config.model.moe_layers=none` gives the dense Swin (the model before upcycling, PETALface's
base); blocks are numbered 0..21 over the stages.

Recipes (the arg after the colon), with the official FaceMoE configs' values:
  wf4m (default): WebFace4M pre-training, CosFace m=0.4 (s=64) via Partial FC at 0.3, AdamW lr 1e-3
    wd 0.05, global batch 1024 (128 x 8 GPUs), 26 epochs with 1 warm-up epoch, linear decay to 0,
    gradient-norm clip 5. The official script computes the router losses but does not add them.
  tinyface_fc: stage 1 of the low-resolution adaptation (official `tinyface_ft_fc.py` +
    `train_fc.py`): start from the pre-trained model (`--config.init_from=` a workdir or the
    official checkpoint), backbone frozen, only a new classifier trains: Partial FC 0.6, AdamW
    lr 1e-3 wd 0.1, batch 16 per GPU x 8, 10 epochs of TinyFace's 7,804 images (600 steps) with
    2 warm-up epochs; the frozen backbone runs in train mode (`backbone.train()`), so its
    BatchNorm statistics still move.
  tinyface_full: stage 2 (official `tinyface_ft_full.py` + `train_full.py`): everything trains,
    starting from the tinyface_fc run *with its classifier* (`--config.init_from=FC_WORKDIR`),
    lr 1e-4 wd 0.1, global batch 64 (8 x 8 GPUs), 40 epochs (4,840 steps) with 4 warm-up epochs,
    all classes sampled, official low-resolution augmentation (p=0.2), and lambda_aux = 10 on
    the official router losses summed over the 22 MoE layers: 10 * (1e-3 * z + 1e-2 * balance).
  briar_fc / briar_full: the same pair on BRIAR (778 identities, 301,000 images): fc at lr 1e-3,
    batch 64 x 8, 20 epochs (2 warm-up), all classes; full at lr 5e-6, batch 8 x 8, 20 epochs
    (2 warm-up). The official fc config also accumulates gradients over 24 iterations (not
    modelled: the batch here is the per-iteration one).
Both stages clip only the backbone's gradients (`clip_grad_norm_(backbone.parameters(), 5)`):
`config.optimizer.clip_scope="encoder"`.

Until a real training set is given (`--config.data.train=...`), the data are the procedural
synthetic identities with the recipe's number of classes (`config.data.synthetic_identities`;
the adaptation stages use the low-resolution synthetic set, `synthetic_lr`); a real set's class
count comes from the data.

Run (CPU smoke test of the full-size model; about two minutes of compilation on 2 cores):
  python -m facemoe_jax.main --config configs/swin_moe_120.py:tinyface_full --workdir /tmp/swin \
      --config.train.num_steps=1 --config.train.batch_size=2
"""

from configs import common

RECIPES = ("wf4m", "tinyface_fc", "tinyface_full", "briar_fc", "briar_full")

# (classes, images, per-GPU batch, epochs, warm-up epochs, lr) of the official configs; 8 GPUs.
_STAGES = {
    "tinyface_fc": (2_570, 7_804, 16, 10, 2, 1e-3),
    "tinyface_full": (2_570, 7_804, 8, 40, 4, 1e-4),
    "briar_fc": (778, 301_000, 64, 20, 2, 1e-3),
    "briar_full": (778, 301_000, 8, 20, 2, 5e-6),
}
GPUS = 8


def get_config(arg=None):
    recipe = arg or "wf4m"
    if recipe not in RECIPES:
        raise ValueError(f"configs/swin_moe_120.py:{recipe} is not one of {RECIPES}")
    config = common.get_base_config()
    config.model.update(
        name="swin_moe",
        image_size=120,
        patch_size=6,
        width=384,
        mlp_ratio=4.0,
        embed_dim=512,
        num_experts=3,
        top_k=2,
        router_combine="raw_logits",
        capacity_factor=0.0,  # dropless, as the official loop over experts
        drop_path_rate=0.05,
        moe_layers="all",
    )
    # Swin-only fields (validated by models.build_swin).
    config.model.depths = (2, 18, 2)
    config.model.stage_heads = (8, 16, 16)
    config.model.window_size = 5
    config.model.head_dropout = 0.25
    config.loss.update(
        margin="combined",
        m1=1.0,
        m2=0.0,
        m3=0.4,
        scale=64.0,
        router_z_loss="official",
        load_balance_loss="official",
        aux_reduce="sum",
    )
    config.optimizer.update(name="adamw", decay_power=1.0, grad_clip_norm=5.0, clip_scope="encoder")
    config.checkpoint.update(every_steps=2000, max_to_keep=3)
    if recipe == "wf4m":
        config.loss.update(sample_rate=0.3, z_coef=0.0, balance_coef=0.0)
        config.optimizer.update(learning_rate=1e-3, weight_decay=0.05, warmup_steps=4_136)
        config.train.update(num_steps=107_535, batch_size=1024, log_every_steps=100)
        config.data.update(train="synthetic", synthetic_identities=205_990, low_res_prob=0.0)
        config.eval.update(synthetic_pairs=6000, low_resolutions="8,16,24")
        return config

    classes, images, per_gpu, epochs, warmup_epochs, lr = _STAGES[recipe]
    batch = per_gpu * GPUS
    steps_per_epoch = images // batch  # the official schedulers' integer division
    config.optimizer.update(
        learning_rate=lr, weight_decay=0.1, warmup_steps=steps_per_epoch * warmup_epochs
    )
    config.train.update(num_steps=steps_per_epoch * epochs, batch_size=batch, log_every_steps=50)
    config.data.update(train="synthetic_lr", synthetic_identities=classes)
    common.low_resolution_eval(config)
    if recipe.endswith("_fc"):
        # Only the new classifier trains; the backbone runs in train mode, so its BatchNorm
        # statistics still move (the official train_fc.py); the router losses do not matter.
        config.loss.update(
            sample_rate=0.6 if recipe == "tinyface_fc" else 1.0, z_coef=0.0, balance_coef=0.0
        )
        config.train.update(trainable="^classifier/", update_batch_stats=True)
    else:
        lambda_aux = 10.0
        # Each GPU of the official DDP run balances its own 16 images' tokens.
        config.loss.update(
            sample_rate=1.0,
            z_coef=lambda_aux * 1e-3,
            balance_coef=lambda_aux * 1e-2,
            aux_statistics="per_device",
        )
        # Continues the classifier of the fc stage (train_full.py loads state_dict_softmax_fc).
        config.init_classifier = True
        config.data.update(low_res_prob=0.2, low_res_min_ratio=0.2, low_res_max_ratio=1.0)
    return config
