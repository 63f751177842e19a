r"""The recognizability index (Chai et al., CVPR 2023, our reading) on the CPU demo model.

The demo ViT-MoE (configs/demo.py: 48x48 synthetic faces, 1,000 identities, 700 steps of 128)
with everything of the method on (facemoe_jax/recipes.recognizability):
  - the unrecognizable-identity centre c_UI in the train state, an EMA (momentum 0.9) of the
    normalised embeddings of 32 batch images a step degraded to 4 px plus noise;
  - the recognizability index RI in [0, 1] from the angle to c_UI and the margin between the own
    class prototype and the hardest negative (losses/recognizability.py gives the formula);
  - the index diversion hinge on images with RI < 0.5 (cos to c_UI pushed below 0.2);
  - perceptibility attention over the ViT tokens before the embedding head;
  - a quality head (`FaceEncoder.quality(images)`) regressing, with smooth-L1 (beta 0.75), the
    "agreement" target of the batch's geometry-only images copied at 4, 6, 8, 12, 16, 24, 32 px
    and full size: half how close each copy is to its own full-size embedding, half its mean
    cosine to the other full-size images of its class (per-class means in the train state;
    docs/recognizability.md, design note 5), from the stop-gradient embedding, its log norm and the
    detail statistics of the patch embedding (the share of its response that comes from the
    input's 2 and 4 px detail, per channel).
Training images are degraded to 8-32 px half of the time (target_res_prob=0.5), so the batch
holds faces from unrecognisable to sharp and RI has something to rank.

Run:
  python -m facemoe_jax.main --config configs/recognizability.py --workdir runs/ri
Besides the demo's evaluation it prints the quality-versus-resolution line (Spearman rho between
the predicted quality and the resolution of held-out faces degraded from 48 to 8 px) and the
error-versus-reject summary of the quality head, the embedding norm and random rejection, on the
verification pairs and on 56,000 pairs of 1,000 held-out identities x 8 images (with a bootstrap
interval of head minus norm) (eval/error_vs_reject.png, eval/quality_vs_resolution.png,
eval/perceptibility_map.png). An optional second stage trains the quality head alone on the
frozen encoder (docs/recognizability.md):
  python -m facemoe_jax.main --config configs/recognizability.py --workdir runs/ri_head \
    --config.init_from=runs/ri --config.init_classifier=True --config.train.trainable=quality_head
"""

from configs import demo

from facemoe_jax import recipes


def get_config(arg=None):
    del arg
    config = demo.get_config()
    recipes.recognizability(config)
    config.data.update(target_res_prob=0.5, target_resolutions="8,12,16,24,32")
    config.eval.quality_identities = 1000  # error-versus-reject on 56,000 held-out pairs
    return config
