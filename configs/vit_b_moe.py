r"""ViT-B/9 MoE face encoder at WebFace4M scale (the user's entry point).

ViT-B as insightface's arcface_torch defines it for faces: 112x112 input, patch 9 (144 tokens),
width 512, depth 24, 8 heads, MLP 4x with ReLU6, 512-d embedding. Every second block's MLP is an
MoE with 8 experts and top-2 routing. CosFace m=0.4 (s=64) through Partial FC at 0.3, AdamW lr 1e-3
wd 0.1, global batch 1024 (128 x 8 GPUs in the PyTorch recipe), 26 epochs of WebFace4M
(4,235,242 images, 205,990 identities): 107,535 steps with one warm-up epoch (4,136 steps), linear
decay to 0, gradient-norm clip 5.

Until a real training set is given (`--config.data.train=...`, docs/data.md), the run uses the
procedural synthetic identities with the same number of classes, so the command runs anywhere
(`config.data.synthetic_identities`; a real set's class count comes from the data).

Run (CPU smoke test, a few minutes, mostly compilation):
  python -m facemoe_jax.main --config configs/vit_b_moe.py --workdir /tmp/vit_b_moe \
      --config.train.num_steps=2 --config.train.batch_size=4 --config.eval.synthetic_pairs=0
It prints the parameter count (290M encoder parameters, most of them the 12 x 8 experts, plus
105M class-centre parameters), the compile time (about 70 s on 2 CPU cores) and FLOPs of the
train step, then the loss of the two steps (about 40: CosFace with s=64 over 205,990 classes).
"""

from configs import common


def get_config(arg=None):
    del arg
    config = common.get_base_config()
    config.model.update(
        image_size=112,
        patch_size=9,
        width=512,
        depth=24,
        num_heads=8,
        moe_layers="every:2",
        num_experts=8,
        top_k=2,
        drop_path_rate=0.1,
    )
    config.loss.update(margin="combined", m1=1.0, m2=0.0, m3=0.4, sample_rate=0.3)
    config.optimizer.update(
        name="adamw",
        learning_rate=1e-3,
        weight_decay=0.1,
        warmup_steps=4_136,
        decay_power=1.0,
        grad_clip_norm=5.0,
    )
    config.train.update(num_steps=107_535, batch_size=1024, log_every_steps=100)
    config.data.update(
        train="synthetic", synthetic_identities=205_990, synthetic_images_per_identity=20
    )
    config.eval.update(synthetic_pairs=6000, low_resolutions="8,16,24")
    config.checkpoint.update(every_steps=2000, max_to_keep=3)
    return config
