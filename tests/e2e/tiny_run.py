"""The command-line flags of the tiny demo run the end-to-end tests start as subprocesses: a
2-block ViT-MoE at 32 px on 16 synthetic identities, every step logged, no evaluation."""


def tiny_run_flags(steps: int, checkpoint_every: int) -> list[str]:
    return [
        f"--config.train.num_steps={steps}",
        "--config.train.batch_size=16",
        "--config.train.log_every_steps=1",
        f"--config.checkpoint.every_steps={checkpoint_every}",
        "--config.checkpoint.max_to_keep=3",
        "--config.data.num_classes=16",
        "--config.data.synthetic_images_per_identity=4",
        "--config.loss.class_rows_multiple=8",
        "--config.model.image_size=32",
        "--config.model.width=32",
        "--config.model.depth=2",
        "--config.model.num_heads=2",
        "--config.model.embed_dim=32",
        "--config.optimizer.warmup_steps=1",
        "--config.eval.synthetic_pairs=0",
        "--config.eval.low_resolutions=",
        "--config.eval.routing_map_faces=0",
        "--config.eval.synthetic_tinyface_identities=0",
    ]
