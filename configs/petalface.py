r"""PETALface (WACV 2025, Kartik-3004/PETALface): two quality-mixed LoRA adapters per attention
qkv on a frozen HR pre-trained Swin, mixed per image by image quality `a`.

Model (`swin_256new_iqa`): a *dense* Swin, 120x120, patch 6, width 384, depths 2/18/2, heads
8/16/16, window 5, absolute position embedding, drop-path 0.05; its shifted windows compute the
attention mask but never apply it (`apply_shift_mask=False`, needed for weight parity); head
LN -> flatten -> BN -> Dropout 0.25 -> Linear(38400 -> 512) -> BN. Adapters: rank 8 on the qkv of
all 22 blocks, y = Wx + b + Drop(B1 A1 ((1-a) x)) + Drop(B2 A2 (a x)), scale 1, dropout 0.1, both
A and B trunc_normal(0.02) at the start (what the released code really does), plus one plain
adapter on the Linear(38400 -> 512). 1,441,792 trainable backbone parameters of 213.7M (0.67 %);
exports load with strict=True into the official model (`get_model("swin_256new_iqa", r=8,
use_lora=True)`).

Training (official train_iqa.py): everything frozen but the adapters and a new classifier;
frozen BatchNorm statistics still update (`backbone.train()`); CosFace m=0.4 s=64, all classes;
AdamW lr 5e-4 wd 0.1 (decay on the adapters too); linear warm-up then linear decay; batch
8 per GPU x 8; gradient clip 5 on the backbone's (i.e. the adapters') gradients.
`a = 0.5 + (score - threshold)` per image from a no-reference quality score: the official code
uses pyiqa BRISQUE or CNNIQA (downloads); the built-in here is our sharpness measure
(`models/quality.py`; `--config.model.lora.quality=package.module:function` for your own).

Recipes (the arg after the colon):
  tinyface (default): TinyFace, 2,570 identities / 7,804 images, 50 epochs, 2 warm-up (6,050 steps)
  briar: BRIAR, 778 identities / 301,000 images, 10 epochs, 1 warm-up
  briar_r32: the same at rank 32 (the paper's BRIAR rank; the released BRIAR weights are rank 8)
  demo: the demo-size ViT-MoE of configs/demo.py with PETALface's adapters (rank 4 on qkv, 2 %
    of the encoder): what the low-resolution study's `petalface` row trains.

Start from an HR pre-trained run: `--config.init_from=W` (a workdir of the dense Swin,
`configs/swin_moe_120.py --config.model.moe_layers=none`, or the official `model.pt`).

Run (CPU smoke test of the full-size model):
  python -m facemoe_jax.main --config configs/petalface.py --workdir /tmp/petal \
      --config.train.num_steps=1 --config.train.batch_size=2
"""

from configs import common, demo
from facemoe_jax import recipes

RECIPES = ("tinyface", "briar", "briar_r32", "demo")
GPUS, PER_GPU = 8, 8
# (classes, images, epochs, warm-up epochs) of the official commands.
_DATA = {"tinyface": (2_570, 7_804, 50, 2), "briar": (778, 301_000, 10, 1)}


def get_config(arg=None):
    recipe = arg or "tinyface"
    if recipe not in RECIPES:
        raise ValueError(f"configs/petalface.py:{recipe} is not one of {RECIPES}")
    if recipe == "demo":
        config = demo.get_config()
        recipes.petalface(config, rank=4, head=False)
        config.loss.scale = 32.0  # the demo's scale
        config.data.update(
            train="synthetic_lr", synthetic_identities=600, synthetic_images_per_identity=8
        )
        config.train.update(num_steps=300)
        config.optimizer.update(warmup_steps=30)
        config.eval.update(low_resolution_sides="both,probe", synthetic_tinyface_identities=200)
        return config

    config = common.get_base_config()
    config.model.update(
        name="swin_moe",
        image_size=120,
        patch_size=6,
        width=384,
        mlp_ratio=4.0,
        embed_dim=512,
        moe_layers="none",
        drop_path_rate=0.05,
    )
    config.model.depths = (2, 18, 2)
    config.model.stage_heads = (8, 16, 16)
    config.model.window_size = 5
    config.model.head_dropout = 0.25
    config.model.apply_shift_mask = False
    recipes.petalface(config, rank=32 if recipe == "briar_r32" else 8, head=True)
    config.loss.scale = 64.0
    classes, images, epochs, warmup = _DATA[recipe.split("_")[0]]
    steps_per_epoch = images // (PER_GPU * GPUS)
    config.optimizer.warmup_steps = steps_per_epoch * warmup
    config.train.update(
        num_steps=steps_per_epoch * epochs, batch_size=PER_GPU * GPUS, log_every_steps=50
    )
    config.data.update(train="synthetic_lr", synthetic_identities=classes)
    common.low_resolution_eval(config)
    config.checkpoint.update(every_steps=2000, max_to_keep=3)
    return config
