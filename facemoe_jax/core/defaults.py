"""Every config field of every run, with its default: the one place defaults live.

`get_base_config()` builds a full config that a recipe (configs/*.py) overrides; code reads
fields as attributes (`config.eval.lfw_dir`) and never repeats a default. `upgrade(saved)`
turns a config saved by an earlier run, which may predate fields added since, into a full one.

Names other tools rely on (keep them): config.seed, config.train.num_steps,
config.train.batch_size (global, over all hosts and devices), config.checkpoint.every_steps,
config.mesh (axis sizes, -1 = the remaining devices), config.eval.
"""

import copy
import math
from collections.abc import Mapping

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # PyTorch weights (.pt/.safetensors: our export, FaceMoE's model.pt or checkpoint_gpu_0.pt, a
    # dense insightface ViT to upcycle) that a new run starts from; "" = random init.
    config.init_from = ""
    # Start from an earlier run instead (init_from = a workdir, W/checkpoints or
    # W/checkpoints/STEP): parameters merged by path (facemoe_jax/train/init_from.py). With
    # init_classifier the class centres come along when the class count matches.
    config.init_classifier = False

    config.model = ml_collections.ConfigDict(
        dict(
            name="vit_moe",
            image_size=112,
            patch_size=9,
            width=512,
            depth=24,
            num_heads=8,
            mlp_ratio=4.0,
            embed_dim=512,
            moe_layers="every:2",  # "every:N", "last:N", "all", "none" or "1,3,5"
            num_experts=8,
            top_k=2,
            router_combine="softmax_topk",  # or "raw_logits" (official FaceMoE)
            capacity_factor=0.0,  # 0 = dropless (sorted tokens + grouped matmul); > 0 = capacity path
            drop_path_rate=0.1,
            dtype="float32",  # activations; "bfloat16" keeps params, router and losses float32
            # insightface CNNs (name="iresnet" with depth 18/34/50/100/200, or "mobilefacenet";
            # models/iresnet.py, models/mobilefacenet.py). dtype="bfloat16" is their fp16=True.
            dropout=0.0,  # IResNet: dropout before the fc layer of the head (arcface_torch's)
            # Evaluation-mode 3x3 stride-1 convolutions of IResNets and ONNX graphs: "winograd"
            # (kernels/winograd.py, where it is faster; equal to "direct" to about 1e-6 of the
            # layer's scale) or "direct" (XLA's). Training always uses the direct convolution.
            conv_algorithm="winograd",
            mobilefacenet_blocks=(1, 4, 6, 2),  # arcface_torch mbf; mbf_large: (2, 8, 12, 4)
            mobilefacenet_scale=2,  # width multiplier: mbf 2, mbf_large 4
            # Swin (name="swin_moe"; its stage fields are set by its configs): PETALface's Swin
            # computes the shifted-window mask but never applies it.
            absolute_pos_embed=True,
            apply_shift_mask=True,
            # Any ONNX face model (name="onnx"; models/onnx_graph.py): its file, and how its
            # input is normalised, (pixel - mean) / std in its channel order; negative = the
            # graph's default (raw pixels when it normalises inside, else 127.5 / 127.5).
            # image_size and embed_dim must be the graph's.
            onnx_path="",
            onnx_input_mean=-1.0,
            onnx_input_std=-1.0,
            onnx_channel_order="RGB",
            # "every_conv": a BatchNorm after every convolution of the graph, for test-time
            # BatchNorm adaptation (config.eval.adapt_bn) of a graph whose BatchNorms were folded
            # into its convolutions. Each is the identity at its statistics, estimated from
            # onnx_batchnorm_images undegraded training images (config.data.train, seeded by
            # config.seed) when the loaded weights lack them (train/calibrate_bn.py).
            onnx_batchnorm="off",
            onnx_batchnorm_images=512,
            # Recognizability heads (models/recognizability.py; configs/recognizability.py):
            # attention over tokens / feature-map positions before the embedding head, and a
            # head regressing the recognizability index (needs config.recognizability.enabled).
            perceptibility_attention=False,
            quality_head=False,
            quality_head_dropout=0.1,
            # What the quality head reads: "multiscale+embedding", "multiscale" (per channel of
            # the patch embedding / IResNet stem, the log share of its response that comes from
            # the input's finest detail, at 2 and 4 px; not for mobilefacenet), "patch+embedding",
            # "patch" (per-channel mean and std over positions of the patch-embedding tokens /
            # the CNN stem) or "embedding"; "multiscale+embedding+norm" adds the log of the
            # embedding's norm, times quality_head_norm_scale.
            quality_head_input="multiscale+embedding+norm",
            quality_head_norm_scale=8.0,
        )
    )

    # Low-rank adapters (models/lora.py; PETALface = rank 8 on qkv, quality_mix, head adapter).
    config.model.lora = ml_collections.ConfigDict(
        dict(
            rank=0,  # 0 = no adapters
            scale=1.0,  # s in y = Wx + s * B A x (official: 1, no alpha / rank)
            dropout=0.1,  # on the adapter output
            where="qkv",  # comma list of "qkv", "proj", "mlp" (dense MLPs)
            init="official",  # "official" (A, B ~ trunc_normal 0.02) or "zero_up" (B = 0)
            quality_mix=True,  # two adapters mixed per image by `a` (PETALface); False = LoRA
            head=False,  # one plain adapter on the Swin embedding projection (PETALface)
            # Where `a` comes from when the input pipeline gives none (models/quality.py):
            # a = 0.5 + quality_sign * (score - quality_threshold).
            # built-in estimator, "recognizability:WORKDIR" (a trained quality head) or
            # "package.module:function"
            quality="sharpness",
            quality_threshold=0.5,
            quality_sign=1.0,  # +1: higher score = better (CNNIQA); -1: lower = better (BRISQUE)
        )
    )

    # The recognizability index (losses/recognizability.py documents every formula).
    config.recognizability = ml_collections.ConfigDict(
        dict(
            enabled=False,  # c_UI in the train state, RI, diversion and quality losses
            ui_pixels=4,  # unrecognizable copies: resized to this many pixels ...
            ui_noise_std=0.1,  # ... plus this Gaussian noise ([-1, 1] pixel scale)
            ui_images=32,  # batch images given a degraded copy each step (0 = all)
            centre_momentum=0.9,  # EMA of the unrecognizable-identity centre c_UI
            ui_weight=0.5,  # RI = ui_weight * s_UI + (1 - ui_weight) * s_cls
            # s_UI = clip(angle(e, c_UI) / this, 0, 1) and s_cls = clip(0.5 + (theta_N -
            # theta_P) / (2 * this), 0, 1), radians; pi = the angles' full range: no clipping.
            ui_angle_scale=math.pi,
            margin_angle_scale=math.pi,
            diversion_weight=1.0,  # index diversion loss weight (0 = off)
            diversion_threshold=0.5,  # images with RI below this are diverted ...
            diversion_margin=0.2,  # ... until cos(e, c_UI) <= this
            diversion_weighting="threshold",  # "threshold" ([RI < t]) or "soft" (1 - RI)
            quality_weight=1.0,  # smooth-L1 regression of RI by the quality head ...
            quality_beta=0.75,
            # ... over copies of this many batch images (0 = all), spread over these sizes and
            # the full size (stop-gradient embeddings: the head learns, the encoder does not).
            quality_images=0,
            quality_pixels="4,6,8,12,16,24,32",
            # The copies are made from the geometry-only images ("clean": the pipeline's paired
            # mode supplies them as batch["image_hr"]) or from the batch as augmented ("batch").
            quality_source="clean",
            # The head's target (losses/recognizability.py items 4 and 5): "agreement" = (1 - w)
            # * (1 - (angle to the copy's own full-size embedding / pi) ** quality_angle_power)
            # + w * the copy's mean cosine to its class's other full-size images (w =
            # quality_agreement_weight; the class means average the last agreement_window
            # images). Before: RI with the own full-size embedding as its positive ("own_full")
            # or with the class centre ("prototype", item 2's RI), angles to the power
            # quality_angle_power and quality_ui_weight in place of ui_weight. The first
            # version: "batch", "prototype", 1.0, 0.5 and quality_head_input="embedding".
            quality_target="agreement",
            quality_angle_power=0.5,
            quality_ui_weight=0.0,
            quality_agreement_weight=0.5,
            agreement_window=8,
        )
    )

    config.loss = ml_collections.ConfigDict(
        dict(
            margin="combined",  # "combined" (CosFace/ArcFace/SphereFace) or "adaface"
            scale=64.0,
            m1=1.0,  # SphereFace multiplicative angular margin
            m2=0.0,  # ArcFace additive angular margin
            m3=0.4,  # CosFace additive cosine margin
            adaface_margin=0.4,
            adaface_h=0.333,
            sample_rate=1.0,  # Partial FC: share of class centres per step (1 = all)
            # How a fresh classifier's centres start: "random" (the initialiser) or "imprint"
            # (train/imprint.py: each class's normalised mean embedding by the start model, from
            # up to imprint_images_per_class of its training images, undegraded).
            centre_init="random",
            imprint_images_per_class=4,
            # Centre rows = num_classes rounded up to this, so the class axis splits evenly over
            # any device count dividing it (and checkpoints move between meshes).
            class_rows_multiple=1024,
            router_z_loss="st_moe",  # "st_moe": mean(logsumexp^2); "official": mean(logits^2)
            load_balance_loss="switch",  # "switch": E*sum f*P; "official": E*sum(imp*load)/T^2
            aux_reduce="mean",  # router losses over MoE blocks: "mean" or "sum" (official)
            # Whose tokens the load balance counts: "global" (the whole batch) or "per_device"
            # (each device's share, losses averaged: the official DDP recipe's semantics).
            aux_statistics="global",
            z_coef=1e-3,
            balance_coef=1e-2,
        )
    )

    config.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",  # "adamw" or "sgd"
            learning_rate=1e-3,
            weight_decay=0.1,
            momentum=0.9,  # SGD only
            b1=0.9,
            b2=0.999,
            warmup_steps=0,
            decay_power=1.0,  # polynomial decay from the peak to end_learning_rate
            end_learning_rate=0.0,
            grad_clip_norm=5.0,  # 0 disables clipping
            clip_scope="all",  # "all" or "encoder" (official: class centres never clipped)
        )
    )

    config.train = ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            batch_size=128,  # global
            log_every_steps=50,
            # Steps with a non-finite loss or gradient are skipped (state unchanged, counted in
            # train/skipped_steps); this many in a row stop the run with a checkpoint.
            max_bad_steps=10,
            # Regexes (comma list) over parameter paths ("encoder/blocks_1/moe/...", "classifier/centers");
            # a parameter trains when one matches, the rest are frozen (no optimiser state).
            trainable=".*",  # comma list, e.g. "lora,^classifier/"
            # Whether BatchNorm layers whose parameters are all frozen still update their running
            # statistics (PETALface's official code does: backbone.train()).
            update_batch_stats=False,
        )
    )

    config.data = ml_collections.ConfigDict(
        dict(
            # "synthetic", "recordio:PATH", "folder:PATH", "tfds:NAME", "arrayrecord:PATH"
            train="synthetic",
            # The classifier's size: 0 = the data's class count; any other value is checked
            # against the data before training starts.
            num_classes=0,
            num_images=0,  # checked against the data when > 0
            # Identities the synthetic sources render (a non-zero num_classes overrides it).
            synthetic_identities=1000,
            synthetic_images_per_identity=20,
            synthetic_cache=False,  # keep rendered synthetic images in memory (small sets only)
            tfds_split="train",
            tfds_data_dir="",
            image_key="image",  # TFDS feature names
            label_key="label",
            worker_count=0,  # grain worker processes (0 = in the main process)
            max_bad_share=0.001,  # stop if more than this share of records is unreadable
            # Image folders (data/folder.py): identities to keep / to drop (LFW's people files
            # or one name per line; "" = all), and the fewest images an identity needs to be a
            # class (smaller ones stay in the data with label -1, outside the margin loss).
            people_file="",
            exclude_people_file="",
            min_images_per_identity=1,
            # Augmentation (data/augment.py; official FaceMoE: augment.official_augmentation).
            crop_prob=0.0,  # crop with zero padding
            crop_min_scale=0.2,
            flip_prob=0.5,
            photometric_prob=0.0,  # brightness/contrast/saturation jitter
            photometric_strength=0.5,
            gaussian_blur_prob=0.0,
            gaussian_blur_max_sigma=2.0,
            motion_blur_prob=0.0,
            motion_blur_max_length=9,
            low_res_prob=0.0,  # official FaceMoE low-resolution augmentation probability
            low_res_min_ratio=0.2,
            low_res_max_ratio=1.0,
            target_res_prob=0.0,  # degrade to exactly one of target_resolutions pixels
            target_resolutions="8,12,16,24",
            noise_prob=0.0,  # additive Gaussian sensor noise
            noise_max_sigma=10.0,
            jpeg_prob=0.0,  # JPEG re-compression
            jpeg_min_quality=10,
            jpeg_max_quality=60,
            grayscale_prob=0.0,
            # Acquisition-like low resolution (data/degrade.acquisition_low_resolution): optical
            # blur, a small sensor of N pixels, sensor noise and JPEG at that size, resized back
            # to the input. Used by the "synthetic_lr" training source (a stand-in for TinyFace's
            # training split: other identities, every image captured small) and by the probes of
            # the synthetic TinyFace-like evaluation.
            acquisition_min_pixels=8,
            acquisition_max_pixels=16,
            acquisition_blur=0.5,  # max optical blur sigma, in low-resolution pixels
            acquisition_noise_sigma=6.0,  # max sensor noise, grey levels
            acquisition_jpeg_quality="30,80",  # JPEG quality range at the small size
            # The same capture as a training augmentation (a fresh capture per epoch, after the
            # geometry): the LR half of distillation's paired HR/LR images.
            acquisition_prob=0.0,
        )
    )

    config.eval = ml_collections.ConfigDict(
        dict(
            synthetic_pairs=1000,  # verification pairs of held-out synthetic identities (0 = off)
            bin_dir="",  # folder of insightface .bin verification sets ("" = none)
            bin_sets="",  # e.g. "lfw,cfp_fp,agedb_30"; "" = every .bin in bin_dir
            low_resolutions="8,12,16,24,32,112",  # resolution sweep, pixels (>= input = no change)
            low_resolution_sides="both",  # "both", "probe" (second face only) or "both,probe"
            low_resolution_sets="synthetic",  # pair sets to sweep, e.g. "synthetic,lfw" or "all"
            # LFW from its aligned folder and pairs files (evaluate/lfw.py): the folder holding
            # aligned112/ ("" = skip), the pairs files, comma-separated (pairsDevTest.txt: View 1,
            # threshold from pairsDevTrain.txt; pairs.txt: View 2, 10-fold; FILE@PEOPLE: only
            # the pairs among those people), sizes, "both" faces, "probe" or "both,probe".
            lfw_dir="",
            lfw_pairs="pairsDevTest.txt",
            lfw_resolutions="112,24,16,12,8",
            lfw_degrade="both",
            ijbb_dir="",  # IJB-B root with meta/ and loose_crop/ ("" = skip)
            ijbc_dir="",  # IJB-C root
            # IJB face alignment: "official" (warp to the 112x112 ArcFace template, then bilinear
            # resize to the input size, as the official IJB script) or "direct" (one warp).
            ijb_alignment="official",
            tinyface_dir="",  # folder with Probe/, Gallery_Match/, Gallery_Distractor/
            tinyface_mat_dir="",  # folder of the .mat lists if not in tinyface_dir
            # Synthetic TinyFace-like identification (evaluate/synthetic_tinyface.py; 0 = off):
            # held-out identities, acquisition-like LR probes against a HR gallery of one match
            # per identity plus HR distractor identities; closed-set rank-k.
            synthetic_tinyface_identities=0,
            synthetic_tinyface_probes=2,  # LR probes per identity
            synthetic_tinyface_distractors=1000,  # HR distractor identities in the gallery
            synthetic_tinyface_ranks="1,5,10",
            quality_fmr=1e-3,  # error-versus-reject threshold: this false-match rate
            # Models with a quality head (config.model.quality_head): held-out faces of the
            # first pair set degraded to these sizes (and full size) for quality vs resolution.
            quality_resolutions="8,12,16,24,32",
            quality_resolution_faces=200,
            # ... and error-versus-reject on every same-identity pair of this many held-out
            # identities with quality_images_per_identity images each, plus as many impostor
            # pairs (0 = only the verification sets, where at 1,000 pairs the FMR=1e-3
            # threshold is the single highest impostor score).
            quality_identities=0,
            quality_images_per_identity=8,
            # ... and on the test pairs of this LFW pairs file under lfw_dir ("" = off; e.g.
            # "pairsDevTest.txt"): error-versus-reject at quality_fmr as given and with the
            # second faces at sizes drawn from quality_resolutions and full size, and quality
            # vs resolution over quality_resolution_faces of its faces (results.json entry
            # "lfw_quality", curves in lfw_quality.json). lfw_pairs may then be "" (no
            # accuracy rows).
            lfw_quality="",
            routing_map_faces=256,  # faces averaged for the expert routing map (0 = off)
            every_steps=0,  # also evaluate every N training steps (0 = only at the end)
            flip_test=True,
            batch_size=256,
            # Test-time BatchNorm adaptation (train/adapt_bn.py): before each set of images
            # is embedded, "cumulative" re-estimates every BatchNorm's mean and variance on its
            # first adapt_bn_batches batches (unlabelled); "per_batch" normalises each batch with
            # its own statistics (FaceBN); "off" uses the trained running statistics.
            adapt_bn="off",
            adapt_bn_batches=8,
        )
    )

    # Instance-relation distillation (train/objectives/distill.py, losses/distill.py,
    # configs/aird.py): a
    # frozen teacher embeds batch["image_hr"] inside the train step, the student the paired LR
    # image (data: a degradation in the augmenter, e.g. data.acquisition_prob=1).
    config.distill = ml_collections.ConfigDict(
        dict(
            # A workdir (latest checkpoint), W/checkpoints/STEP, or a PyTorch file; "" = none.
            # Reloaded at every start (never checkpointed with the student).
            teacher="",
            # A PyTorch teacher's architecture: a config file "path.py[:arg]"; "" = the
            # export's config.json beside the file. A workdir teacher uses its saved config.
            teacher_config="",
            # With teacher "": a config file "path.py[:arg]" trained first, at HR, into
            # WORKDIR/teacher (once; a resumed run reuses it), then used as the teacher.
            pretrain_teacher="",
            # The student starts from the teacher's weights (config.init_from = the teacher) when
            # config.init_from is empty and the architectures match.
            init_student=False,
            instance_weight=0.0,  # x instance loss, added to the margin loss
            relation_weight=0.0,  # x relation loss
            instance_form="cosine",  # "cosine": 1 - cos(s_i, t_i); "mse": of L2-normalised rows
            relation_form="mse",  # "mse": of the B x B cosine matrices; "kl": row softmaxes
            temperature=0.1,  # relation_form="kl" only
            # "" = the teacher runs in the step on batch["image_hr"]; "auto" or a folder = its
            # flip-test embedding of every training record computed once and kept there
            # ("auto": ~/.cache/facemoe_jax/teacher_embeddings), looked up per record
            # (train/teacher_cache.py); for students trained over many epochs.
            teacher_cache="",
        )
    )
    # Cross-resolution consistency (train/objectives/cross_resolution.py): weight x (1 - cos)
    # between the embedding of the degraded image and the model's own stop-gradient embedding of
    # its HR copy (the paired pipeline); 0 = off.
    config.cross_resolution = ml_collections.ConfigDict(dict(weight=0.0))

    config.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=1000,
            max_to_keep=3,
        )
    )

    # --mode=export: with adapters (config.model.lora), fold them into the base weights for
    # this fixed quality a (PETALface -> a plain dense Swin); None keeps the adapters.
    config.export = ml_collections.ConfigDict(
        {"merge_lora_alpha": ml_collections.FieldReference(None, field_type=float)}
    )

    config.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1))
    # (regex over state paths, PartitionSpec entries) pairs, first match wins, unmatched arrays
    # are replicated (facemoe_jax/parallel/sharding.py): experts over `expert`, class centres
    # over every device.
    config.sharding_rules = (
        (r"(^|/)experts/", ("expert",)),
        (r"(^|/)classifier/centers$", (("data", "expert"),)),
    )
    return config


def low_resolution_eval(config: ml_collections.ConfigDict) -> None:
    """The low-resolution fine-tuning recipes' evaluation: the study's columns at full size.

    HR pairs, LR identification (probes captured at 8-16 px against an HR gallery with
    distractors), LR verification with the probe at 8 and 16 px.
    """
    config.eval.update(
        synthetic_pairs=1000,
        low_resolutions="8,16",
        low_resolution_sides="probe",
        synthetic_tinyface_identities=100,
        synthetic_tinyface_distractors=500,
    )


# Fields that change what a run trains, with the value they had in effect before they existed
# (when that differs from today's default): a config saved before a field was added gets this
# value, so an old checkpoint rebuilds the model it was trained with (an embedding-only quality
# head) and trains on as it did. Runtime sections (eval, mesh ...) take today's defaults.
BEFORE_ADDED = {
    "model.quality_head_input": "embedding",
    "recognizability.quality_source": "batch",
    "recognizability.quality_target": "prototype",
    "recognizability.quality_angle_power": 1.0,
}
# ... and fields that took another field's value before they existed (the quality head's first
# target weighed c_UI by the index's own ui_weight).
BEFORE_ADDED_FROM = {"recognizability.quality_ui_weight": "recognizability.ui_weight"}


def _plain(config) -> dict:
    """A deep copy of a dict or ConfigDict as nested plain dicts (FieldReferences resolved)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return {
        key: _plain(value) if isinstance(value, Mapping) else copy.deepcopy(value)
        for key, value in config.items()
    }


def _section(config: dict, name: str) -> tuple[dict, str]:
    """(the dict holding a dotted field, the field's key); {} when a section is absent."""
    *path, key = name.split(".")
    for part in path:
        config = config.get(part, {})
    return (config if isinstance(config, dict) else {}), key


def _upgrade_values(saved: dict) -> dict:
    """Saved values whose form changed since (train.trainable was a tuple of regexes and is a
    comma list; a saved JSON config holds the tuple as a list), and BEFORE_ADDED_FROM."""
    trainable = saved.get("train", {}).get("trainable")
    if isinstance(trainable, (list, tuple)) and not any("," in str(p) for p in trainable):
        saved["train"]["trainable"] = ",".join(str(p) for p in trainable)
    for name, source in BEFORE_ADDED_FROM.items():
        section, key = _section(saved, name)
        source_section, source_key = _section(saved, source)
        if section and key not in section and source_key in source_section:
            section[key] = source_section[source_key]
    return saved


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fill(saved: dict, base: ml_collections.ConfigDict, prefix: str) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict()
    for key, default in base.items(preserve_field_references=True):
        name = prefix + key
        if isinstance(default, ml_collections.ConfigDict):
            section = saved.get(key, {})
            out[key] = _fill(section if isinstance(section, Mapping) else {}, default, name + ".")
        elif key not in saved:
            out[key] = BEFORE_ADDED.get(name, default)
        elif isinstance(default, ml_collections.FieldReference):
            # Keep the field's declared type (export.merge_lora_alpha: a float or None).
            out[key] = ml_collections.FieldReference(saved[key], field_type=default.get_type())
        elif isinstance(default, tuple) and isinstance(saved[key], list):
            out[key] = _tuples(saved[key])  # JSON wrote the tuple as a list
        else:
            out[key] = saved[key]
    for key, value in saved.items():  # sections and fields only the saved config has
        if key not in out:
            out[key] = value
    return out


def upgrade(saved) -> ml_collections.ConfigDict:
    """A config saved by any earlier run (dict or ConfigDict) as a full config of today's code.

    Every field it lacks is filled in, recursively: from BEFORE_ADDED / BEFORE_ADDED_FROM where
    the field changes what was trained and its behaviour before it existed differs from today's
    default, else from get_base_config(). Saved values win, including sections and fields
    today's code no longer has. `saved` is not modified.
    """
    return _fill(_upgrade_values(_plain(saved)), get_base_config(), "")
