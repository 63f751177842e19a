r"""Tiny ViT-MoE on the embedded synthetic identities: the CPU demo (about 2.5 minutes on 2 cores).

48x48 faces, patch 8 (36 tokens), width 64, depth 4 with MoE (4 experts, top-2) in blocks 1 and 3,
CosFace m=0.35 (s=32) over 1,000 training identities x 16 images (rendered once, kept in
memory), AdamW with warm-up and linear decay, 700 steps of 128 images.

The MoE runs the capacity path (factor 1.5, dropped tokens counted in router/dropped_fraction):
on CPU, XLA lowers the dropless grouped matmul densely, which costs E/K = 2x the expert FLOPs.

Run:
  python -m facemoe_jax.main --config configs/demo.py --workdir runs/demo
It prints the model size, the compile time, a loss line every 100 steps (train accuracy of the
class centres rises to ~95 %), then 10-fold verification on 1,000 pairs of held-out identities:
about 96 % at full resolution, about 92 % and 86 % with both faces degraded to 8 and 6 pixels,
the synthetic TinyFace-like identification (LR probes captured at 8-16 px against an HR gallery
with 1,000 distractors: rank-1 about 10 %, against about 62 % for the same probes at full
resolution), and two lines summarising the expert routing map (eval/routing_map.png and its
siblings). `python -m facemoe_jax.study` adapts this model to low resolution
(docs/low_resolution_adaptation.md).
On your own faces (one sub-folder per identity; the class count comes from the data), add
`--config.data.train=folder:DIR`.
"""

from configs import common


def get_config(arg=None):
    del arg
    config = common.get_base_config()
    config.model.update(
        image_size=48,
        patch_size=8,
        width=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        embed_dim=128,
        moe_layers="every:2",
        num_experts=4,
        top_k=2,
        capacity_factor=1.5,
        drop_path_rate=0.0,
    )
    config.loss.update(margin="combined", m3=0.35, scale=32.0, sample_rate=1.0)
    config.optimizer.update(
        name="adamw", learning_rate=2e-3, weight_decay=0.05, warmup_steps=100, grad_clip_norm=5.0
    )
    config.train.update(num_steps=700, batch_size=128, log_every_steps=100)
    config.data.update(
        train="synthetic",
        synthetic_identities=1000,  # the classifier takes a real set's count from the data
        synthetic_images_per_identity=16,
        synthetic_cache=True,
        worker_count=0,
    )
    config.eval.update(
        synthetic_pairs=1000,
        low_resolutions="6,8,12",
        batch_size=250,
        synthetic_tinyface_identities=200,  # LR probes vs an HR gallery with 1,000 distractors
    )
    config.checkpoint.update(every_steps=500, max_to_keep=2)
    return config
