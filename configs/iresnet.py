r"""insightface arcface_torch CNNs: IResNet r18..r200 and MobileFaceNet, with the MS1MV3 recipes.

Models (the arg after the colon): r18, r34, r50 (default), r100, r200 = `iresnet{N}`;
mobilefacenet (arcface_torch `mbf`: blocks 1/4/6/2, scale 2, 2.06M parameters) and
mobilefacenet_large (`mbf_large`: blocks 2/8/12/4, scale 4, 6.31M). 112x112 input, 512-d
embedding, PReLU, BN-Dropout-FC-BN head (`--config.model.dropout`, 0 as arcface_torch's default);
`fp16=True` of the official configs = `config.model.dtype="bfloat16"` (bf16 body, float32
BatchNorm statistics, float32 fc/features head). Exports load with `strict=True` into the
official definitions and arcface_torch checkpoints load here (docs/insightface_cnns.md):
  --config.init_from=backbone.pth              start a run from an insightface checkpoint
  FaceEncoder.from_checkpoint("backbone.pth", config=get_config("r100"))   embed with it

Recipe = arcface_torch's configs/ms1mv3_r50.py (r18..r200) and ms1mv3_mbf.py (MobileFaceNets):
ArcFace m=0.5 s=64 over all 93,431 classes (sample_rate 1.0), SGD momentum 0.9, lr 0.1, weight
decay 5e-4 (mbf: 1e-4), global batch 1024 (128 x 8 GPUs), 20 epochs of 5,179,510 images (mbf:
40), no warm-up, linear decay to 0 (PolynomialLRWarmup, power 1), backbone gradients clipped at
norm 5 (`clip_grad_norm_(backbone.parameters(), 5)`: clip_scope="encoder"). Until a real set is
given (`--config.data.train=recordio:/path/ms1m-retinaface-t1`) the data are the procedural
synthetic identities.

Run (CPU smoke test of an IResNet-18 at full size: about 2 minutes on 2 busy cores; float32,
as bfloat16 convolutions are slow on CPU, and a small evaluation batch to keep memory low):
  python -m facemoe_jax.main --config configs/iresnet.py:r18 --workdir /tmp/r18 \
      --config.train.num_steps=2 --config.train.batch_size=8 --config.data.synthetic_identities=100 \
      --config.model.dtype=float32 --config.eval.batch_size=16 --config.eval.synthetic_pairs=50 \
      --config.eval.low_resolutions=16 --config.eval.routing_map_faces=0
It prints 24.03M encoder parameters, the compile time (~20 s), two loss lines and 50-pair
verification at full size and at 16 px (after two steps these numbers mean little). Then the same command
with `--mode=export` writes /tmp/r18/export/model.pt (187 tensors) that arcface_torch's
`iresnet18().load_state_dict(torch.load(...), strict=True)` accepts (measured: embeddings equal
to 2.8e-6 relative), plus model.safetensors, model.onnx and config.json.
"""

from configs import common

IRESNETS = {"r18": 18, "r34": 34, "r50": 50, "r100": 100, "r200": 200}
MOBILEFACENETS = {  # arg: (blocks, scale), arcface_torch get_mbf / get_mbf_large
    "mobilefacenet": ((1, 4, 6, 2), 2),
    "mobilefacenet_large": ((2, 8, 12, 4), 4),
}
MS1MV3_IMAGES, MS1MV3_CLASSES, GLOBAL_BATCH = 5_179_510, 93_431, 1024


def get_config(arg=None):
    arch = arg or "r50"
    if arch not in IRESNETS and arch not in MOBILEFACENETS:
        raise ValueError(f"configs/iresnet.py:{arch} is not one of {(*IRESNETS, *MOBILEFACENETS)}")
    config = common.get_base_config()
    config.model.update(image_size=112, embed_dim=512, dtype="bfloat16", dropout=0.0)
    if arch in IRESNETS:
        config.model.update(name="iresnet", depth=IRESNETS[arch])
        weight_decay, epochs = 5e-4, 20
    else:
        blocks, scale = MOBILEFACENETS[arch]
        config.model.update(
            name="mobilefacenet", mobilefacenet_blocks=blocks, mobilefacenet_scale=scale
        )
        weight_decay, epochs = 1e-4, 40
    config.loss.update(margin="combined", m1=1.0, m2=0.5, m3=0.0, scale=64.0, sample_rate=1.0)
    config.optimizer.update(
        name="sgd",
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=weight_decay,
        warmup_steps=0,
        decay_power=1.0,
        end_learning_rate=0.0,
        grad_clip_norm=5.0,
        clip_scope="encoder",
    )
    steps_per_epoch = MS1MV3_IMAGES // GLOBAL_BATCH  # the official integer division
    config.train.update(
        num_steps=steps_per_epoch * epochs, batch_size=GLOBAL_BATCH, log_every_steps=100
    )
    config.data.update(train="synthetic", synthetic_identities=MS1MV3_CLASSES)
    config.eval.update(synthetic_pairs=6000, low_resolutions="8,16,24,32")
    config.checkpoint.update(every_steps=2000, max_to_keep=3)
    return config
