"""Every evaluation a config asks for, its results.json, its pictures and its metric-writer logs.

`run_evaluations(model, variables, config, workdir, step, writer)` is what the train loop calls at
the end of training, every ``config.eval.every_steps`` steps, and what ``--mode=eval`` calls on
a checkpoint. From ``config.eval`` it runs, in order:

1. verification pair sets: the held-out synthetic pairs (``synthetic_pairs`` > 0) and the
   insightface `.bin` sets in ``bin_dir`` named by ``bin_sets`` (empty = every `.bin` there):
   10-fold accuracy, TAR@FAR=1e-3, best threshold, and the area under the error-versus-reject
   curve of the embedding-norm quality (``erc_auc``);
2. resolution sweeps of the sets in ``low_resolution_sets`` at ``low_resolutions`` pixels,
   degrading the sides in ``low_resolution_sides`` (entries 'lfw@8px', 'lfw@probe8px');
3. LFW from its aligned folder and pairs files (``lfw_dir``, ``lfw_pairs``, `lfw.py`) at
   ``lfw_resolutions`` pixels, ``lfw_degrade`` "both" faces or the "probe": rows 'lfw_view1@12px';
4. IJB-B / IJB-C 1:1 verification from ``ijbb_dir`` / ``ijbc_dir``: TAR at FAR 1e-6 .. 1e-1;
5. the synthetic TinyFace-like identification (``synthetic_tinyface_identities`` > 0): LR
   probes against an HR gallery with distractors, rank-1/5/10 (`synthetic_tinyface.py`);
   TinyFace rank-1/5/20 from ``tinyface_dir`` (and ``tinyface_mat_dir``);
6. the expert routing map of ``routing_map_faces`` faces of the first pair set;
7. with the recognizability heads (evaluate/recognizability.py): error-versus-reject of every
   pair set by the quality head beside the norm and random rejection, the quality against the
   resolution of ``quality_resolution_faces`` faces degraded to ``quality_resolutions`` pixels
   (quality_vs_resolution.png), and the perceptibility attention map (perceptibility_map.png);
   with ``lfw_quality`` (a pairs file under ``lfw_dir``) the same error-versus-reject on its
   test pairs and quality against resolution over its faces (entry 'lfw_quality', the curves
   in lfw_quality.json).

With ``adapt_bn`` ("cumulative" or "per_batch", `train/adapt_bn.py`) every set of images is embedded
with BatchNorm statistics estimated on that set (test-time adaptation); the routing map is not.

A set named in ``bin_sets`` whose file is missing is skipped with a note; a configured folder that
does not exist is an error (`check_eval_config` runs before training starts). Output:
workdir/eval/results.json ({"step": s, set: {metric: value}}), routing.json, roc.png,
accuracy_vs_resolution.png, error_vs_reject.png, routing_map.png; the same numbers and pictures
go to the metric writers (scalars 'eval/<set>/<metric>', images 'eval/<picture>'). Training
writes them into workdir/eval (the latest periodic or final evaluation); ``--mode=eval`` of the
checkpoint at step N into workdir/eval/stepN_eval, with its own metrics.jsonl, so it never
overwrites the training run's results (train/loop.py `evaluate_checkpoint`).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from facemoe_jax.data import synthetic
from facemoe_jax.core.progress import Progress
from facemoe_jax.evaluate import bin as bin_lib
from facemoe_jax.models.recognizability import has_perceptibility_attention, has_quality_head
from facemoe_jax.train import adapt_bn
from facemoe_jax.evaluate import (
    embed,
    ijb,
    lfw,
    plots,
    quality,
    recognizability as ri_eval,
    routing_map,
    sweep,
    synthetic_tinyface,
    tinyface,
    verification,
)


def check_eval_config(config) -> None:
    """Fails fast, before any training, on eval fields that can never work."""
    ev = config.eval
    sweep.parse_sizes(ev.low_resolutions)
    sweep.parse_sides(ev.low_resolution_sides)
    if ev.bin_dir:
        bin_lib.list_bin_sets(ev.bin_dir, ev.bin_sets)
    for field in ("ijbb_dir", "ijbc_dir", "tinyface_dir", "tinyface_mat_dir"):
        path = ev[field]
        if path and not os.path.isdir(path):
            raise ValueError(f"config.eval.{field}={path!r} is not a directory")
    synthetic_tinyface.check_config(config)
    adapt_bn.check_config(ev)
    lfw.check_config(ev)
    _check_lfw_quality(config)
    sweep.parse_sizes(ev.quality_resolutions)
    identities = ev.quality_identities
    per_identity = ev.quality_images_per_identity
    if identities < 0 or identities == 1 or (identities and per_identity < 2):
        raise ValueError(
            f"config.eval.quality_identities={identities} must be 0 (off) or >= 2, with "
            f"config.eval.quality_images_per_identity={per_identity} >= 2"
        )
    if ev.every_steps < 0:
        raise ValueError(f"config.eval.every_steps={ev.every_steps} must be >= 0 (0 = at the end)")


def _check_lfw_quality(config) -> None:
    """config.eval.lfw_quality: one pairs file under lfw_dir, for a model with a quality head."""
    ev = config.eval
    spec = str(ev.lfw_quality)
    if not spec:
        return
    field = f"config.eval.lfw_quality={spec!r}"
    if not ev.lfw_dir:
        raise ValueError(f"{field} needs config.eval.lfw_dir (the LFW folder holding aligned112/)")
    if not config.model.quality_head:
        raise ValueError(
            f"{field} rejects pairs by the quality head's score, and config.model.quality_head "
            "is False"
        )
    if "," in spec:
        raise ValueError(f"{field}: name one pairs file (e.g. 'pairsDevTest.txt')")
    try:
        lfw.load_protocol(ev.lfw_dir, spec)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


def is_periodic_eval_step(config, step: int, num_steps: int) -> bool:
    """True every config.eval.every_steps steps, except the last (the final evaluation's)."""
    every = config.eval.every_steps
    return every > 0 and step % every == 0 and step != num_steps


def _verification_sets(config):
    """Yields (name, images_a, images_b, issame), one set in memory at a time."""
    ev, size = config.eval, config.model.image_size
    if ev.synthetic_pairs > 0:
        yield (
            "synthetic",
            *synthetic.verification_pairs(
                num_pairs=ev.synthetic_pairs, image_size=size, seed=config.seed
            ),
        )
    if ev.bin_dir:
        for name, path in bin_lib.list_bin_sets(ev.bin_dir, ev.bin_sets):
            if path is None:
                print(f"note: {name}.bin is not in {ev.bin_dir}; skipped", flush=True)
                continue
            yield name, *bin_lib.load_bin(path, size)


def _quality_lines(name: str, metrics: dict) -> list[str]:
    lines = []
    for prefix, label in (("", name), ("mixed_", f"{name} mixed-res")):
        if f"{prefix}fnmr_reject20_quality" in metrics:
            lines.append(
                f"quality {label:>15}: FNMR {metrics[prefix + 'fnmr_reject0']:.3f}; "
                "rejecting the 20 % lowest-quality pairs: quality head "
                f"{metrics[prefix + 'fnmr_reject20_quality']:.3f}, embedding norm "
                f"{metrics[prefix + 'fnmr_reject20_norm']:.3f}, random "
                f"{metrics[prefix + 'fnmr_reject20_random']:.3f}"
            )
            interval = f"{prefix}fnmr_reject20_quality_minus_norm_low"
            if interval in metrics:
                lines[-1] += (
                    f" (head - norm 95 % interval [{metrics[interval]:+.3f}, "
                    f"{metrics[interval[:-3] + 'high']:+.3f}])"
                )
    return lines


QUALITY_SET = "synthetic_quality"  # results.json entry of `_quality_identities`' pairs
LFW_QUALITY_SET = "lfw_quality"  # ... and of config.eval.lfw_quality's pairs


def _quality_identities(config):
    """(faces, pairs): config.eval.quality_identities held-out identities (not those of the
    verification pairs) x quality_images_per_identity images, identity-major, and their pairs
    (evaluate/recognizability.identity_pairs)."""
    ev, size = config.eval, config.model.image_size
    n, k = int(ev.quality_identities), int(ev.quality_images_per_identity)
    pairs = ri_eval.identity_pairs(n, k, config.seed)  # checks n, k first
    faces = np.stack(
        [
            synthetic.render_identity_image(
                synthetic.QUALITY_FIRST_IDENTITY + i, j, size, config.seed
            )
            for i in range(n)
            for j in range(k)
        ]
    )
    return faces, pairs


def _format(name: str, metrics: dict) -> str:
    if "accuracy" in metrics:
        std = f" (± {metrics['accuracy_std'] * 100:.2f})" if "accuracy_std" in metrics else ""
        line = (
            f"eval {name:>18}: accuracy {metrics['accuracy'] * 100:6.2f} %{std}, "
            f"TAR@FAR=1e-3 {metrics['tar@far=1e-3'] * 100:6.2f} %"
        )
        return "\n".join([line, *_quality_lines(name, metrics)])
    if name == QUALITY_SET:
        return "\n".join(_quality_lines(f"{int(metrics['pairs'])} pairs", metrics))
    if name == LFW_QUALITY_SET:
        lines = _quality_lines(f"lfw {int(metrics['pairs'])} pairs", metrics)
        return "\n".join(lines + [f"lfw {_format('quality_vs_resolution', metrics)}"])
    if name == "quality_vs_resolution":
        means = ", ".join(f"{k.split('@')[1]} {v:.3f}" for k, v in metrics.items() if "@" in k)
        return (
            f"quality vs resolution: Spearman rho {metrics['spearman_rho']:.3f} (per face "
            f"{metrics['spearman_rho_per_face']:.3f}); mean quality {means}"
        )
    return f"eval {name:>18}: " + ", ".join(f"{k} {v * 100:.2f} %" for k, v in metrics.items())


def run_evaluations(
    model, variables, config, workdir: str, step: int, writer, outputs: str = "eval"
) -> dict:
    """Runs every configured evaluation; returns {set: metrics} (also in results.json, written
    with the pictures into workdir/`outputs`)."""
    ev, size = config.eval, config.model.image_size
    embed_fn = embed.make_embed_fn(model, flip_test=ev.flip_test)
    adaptation = adapt_bn.from_eval_config(model, ev)  # None: the trained BatchNorm statistics

    # Progress (name, images done/total, ETA): one line per set; a call without one gets its own.
    def embed_array(images, progress=None):
        if progress is not None:
            return embed.embed_images(
                embed_fn, variables, images, ev.batch_size, progress, adaptation
            )
        with Progress("embed", len(images)) as own:
            return embed.embed_images(embed_fn, variables, images, ev.batch_size, own, adaptation)

    def embed_files(load, count, label="embed"):
        with Progress(label, count) as progress:
            return embed.embed_loaded(
                embed_fn, variables, load, count, ev.batch_size, progress, adaptation
            )

    results, roc_curves, erc_curves, resolution_curves, files = {}, {}, {}, {}, {}
    routing_faces = None
    quality_fn = ri_eval.make_quality_fn(model, ev.flip_test) if has_quality_head(model) else None
    quality_faces, ri_pictures = None, {}
    sweep_sets = {s.strip() for s in ev.low_resolution_sets.split(",") if s.strip()}
    sizes = sweep.parse_sizes(ev.low_resolutions)
    sides = sweep.parse_sides(ev.low_resolution_sides)

    for name, images_a, images_b, issame in _verification_sets(config):
        with Progress(f"embed {name}", len(images_a) + len(images_b)) as progress:
            emb_a, emb_b = embed_array(images_a, progress), embed_array(images_b, progress)
        metrics = verification.verification_metrics(emb_a, emb_b, issame)
        scores = 1.0 - verification.pair_distances(emb_a, emb_b) / 2.0
        roc_curves[name] = verification.roc_curve(scores, issame)[:2]
        pair_quality = np.minimum(
            quality.embedding_norm_quality(emb_a), quality.embedding_norm_quality(emb_b)
        )
        erc_curves[name] = quality.error_versus_reject(scores, issame, pair_quality, ev.quality_fmr)
        metrics["erc_auc"] = erc_curves[name]["auc"]
        if quality_fn is not None:
            extra, curves = ri_eval.pair_set_quality(
                quality_fn,
                embed_array,
                variables,
                images_a,
                images_b,
                issame,
                sweep.parse_sizes(ev.quality_resolutions),
                size,
                ev.quality_fmr,
                ev.batch_size,
                config.seed,
            )
            metrics.update(extra)
            erc_curves.update(
                {
                    f"{name}: {kind}": erc
                    for kind, erc in curves.items()
                    if kind != "as given: embedding norm"
                }
            )  # = erc_curves[name]
            if quality_faces is None:
                quality_faces = images_a[: ev.quality_resolution_faces]
        results[name] = metrics
        if routing_faces is None and ev.routing_map_faces > 0:
            routing_faces = np.concatenate([images_a, images_b])[: ev.routing_map_faces]
        if name in sweep_sets or "all" in sweep_sets:
            total = sweep.images_to_embed(len(issame), sizes, sides)
            with Progress(f"embed {name} resolution sweep", total) as progress:
                swept = sweep.resolution_sweep(
                    name,
                    lambda x: embed_array(x, progress),
                    verification.verification_metrics,
                    images_a,
                    images_b,
                    issame,
                    sizes,
                    sides,
                )
            results.update(swept)
            for side in sides:
                # Sizes at or above the input are the full-resolution faces: one point, at S.
                points = {
                    min(px, size): swept[sweep.entry_name(name, px, side)]["accuracy"]
                    for px in sizes
                }
                points[size] = metrics["accuracy"]
                resolution_curves[f"{name} ({side})"] = (list(points), list(points.values()))

    if ev.lfw_dir:
        quiet = Progress("embed lfw", 0, enabled=False)  # evaluate_lfw shows its own progress
        lfw_sizes = sweep.parse_sizes(ev.lfw_resolutions, field="config.eval.lfw_resolutions")
        lfw_cache = {}  # each image embedded once per size across the pairs files and modes
        for pairs_file in lfw.config_pairs(ev):
            for degrade_mode in lfw.config_degrade_modes(ev):
                lfw_result = lfw.evaluate_lfw(
                    lambda images, _flip_test: embed_array(images, quiet),
                    ev.lfw_dir,
                    pairs_file,
                    lfw_sizes,
                    degrade_mode,
                    ev.flip_test,
                    size,
                    cache=lfw_cache,
                )
                results.update(lfw_result["rows"])
                points = {
                    min(m["resolution"], size): m["accuracy"] for m in lfw_result["rows"].values()
                }
                resolution_curves[f"lfw_{lfw_result['label']} ({degrade_mode})"] = (
                    list(points),
                    list(points.values()),
                )

    if quality_fn is not None and ev.lfw_quality:
        pairs = lfw.pair_faces(ev.lfw_dir, ev.lfw_quality, size)
        results[LFW_QUALITY_SET], curves, ri_pictures["quality_curve"] = ri_eval.lfw_pair_quality(
            quality_fn,
            embed_array,
            variables,
            pairs,
            sweep.parse_sizes(ev.quality_resolutions),
            size,
            ev.quality_fmr,
            ev.batch_size,
            ev.quality_resolution_faces,
            config.seed,
        )
        erc_curves.update({f"{LFW_QUALITY_SET}: {kind}": erc for kind, erc in curves.items()})
        files[f"{LFW_QUALITY_SET}.json"] = {
            "pairs_file": ev.lfw_quality,
            "fmr": float(ev.quality_fmr),
            "metrics": results[LFW_QUALITY_SET],
            "error_versus_reject": {
                kind: {k: np.asarray(v).tolist() for k, v in erc.items()}
                for kind, erc in curves.items()
            },
            "quality_vs_resolution": ri_pictures["quality_curve"],
        }

    if quality_fn is not None and ev.quality_identities > 0:
        faces, pairs = _quality_identities(config)
        results[QUALITY_SET], curves = ri_eval.quality_identity_set(
            quality_fn,
            embed_array,
            variables,
            faces,
            pairs,
            int(ev.quality_images_per_identity),
            sweep.parse_sizes(ev.quality_resolutions),
            size,
            ev.quality_fmr,
            ev.batch_size,
            config.seed,
        )
        erc_curves.update({f"{QUALITY_SET}: {kind}": erc for kind, erc in curves.items()})

    if ev.synthetic_tinyface_identities > 0:
        protocol = synthetic_tinyface.build_protocol(config)
        total = sum(len(protocol[k]) for k in ("gallery", "probes", "hr_probes"))
        with Progress("embed synthetic_tinyface", total) as progress:
            results["synthetic_tinyface"] = synthetic_tinyface.evaluate_synthetic_tinyface(
                lambda images: embed_array(images, progress), config, protocol
            )

    for name in ("ijbb", "ijbc"):
        if ev[f"{name}_dir"]:
            meta = ijb.IJBMeta(ev[f"{name}_dir"], name, ev.ijb_alignment)
            label = f"embed {name}"
            metrics, (scores, labels) = ijb.evaluate_ijb(
                meta, lambda load, count: embed_files(lambda i: load(i, size), count, label)
            )
            results[name] = metrics
            roc_curves[name] = verification.roc_curve(scores, labels)[:2]

    if ev.tinyface_dir:
        protocol = tinyface.TinyFaceProtocol(ev.tinyface_dir, ev.tinyface_mat_dir)
        results["tinyface"] = tinyface.evaluate_tinyface(
            protocol, lambda load, count: embed_files(load, count, "embed tinyface"), size
        )

    if quality_faces is not None and len(quality_faces):
        results["quality_vs_resolution"], ri_pictures["quality_curve"] = (
            ri_eval.quality_vs_resolution(
                quality_fn,
                variables,
                quality_faces,
                sweep.parse_sizes(ev.quality_resolutions),
                size,
                ev.batch_size,
            )
        )
    if routing_faces is not None and has_perceptibility_attention(model):
        ri_pictures["attention"] = ri_eval.perceptibility_weights(
            model, variables, routing_faces, ev.batch_size
        )
    routing = {}
    if routing_faces is not None:
        logits = routing_map.collect_router_logits(model, variables, routing_faces, ev.batch_size)
        routing = {n: routing_map.first_choice_shares(x) for n, x in logits.items()}

    _write_outputs(
        os.path.join(workdir, outputs),
        step,
        writer,
        results,
        roc_curves,
        erc_curves,
        resolution_curves,
        routing,
        routing_faces,
        ev.quality_fmr,
        size,
        ri_pictures,
        files,
    )
    return results


def _write_outputs(
    out,
    step,
    writer,
    results,
    roc_curves,
    erc_curves,
    resolution_curves,
    routing,
    routing_faces,
    fmr,
    size,
    ri_pictures=None,
    files=None,
):
    """results.json, the pictures and `files` ({name: JSON-able data}) into `out`; the scalars
    and pictures to `writer`."""
    for name, metrics in results.items():
        print(_format(name, metrics), flush=True)
    scalars = {f"eval/{name}/{k}": v for name, m in results.items() for k, v in m.items()}
    summaries = {name: routing_map.routing_summary(s) for name, s in routing.items()}
    for name, summary in summaries.items():
        print(
            f"routing {name}: positional purity {summary['positional_purity']:.2f}, "
            f"{summary['experts_used']:.0f} experts are a position's first choice",
            flush=True,
        )
        scalars.update({f"eval/routing/{name}/{k}": v for k, v in summary.items()})
    writer.write_scalars(step, scalars)
    if jax.process_index() != 0:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"step": int(step), **results}, f, indent=2)
    for name, data in (files or {}).items():
        with open(os.path.join(out, name), "w") as f:
            json.dump({"step": int(step), **data}, f, indent=2)
    images = {}
    if roc_curves:
        images["roc"] = plots.plot_roc(roc_curves, os.path.join(out, "roc.png"))
    if resolution_curves:
        images["accuracy_vs_resolution"] = plots.plot_resolution_curves(
            resolution_curves, size, os.path.join(out, "accuracy_vs_resolution.png")
        )
    ri_pictures = ri_pictures or {}
    if "quality_curve" in ri_pictures:
        images["quality_vs_resolution"] = plots.plot_quality_vs_resolution(
            ri_pictures["quality_curve"], size, os.path.join(out, "quality_vs_resolution.png")
        )
    if "attention" in ri_pictures:
        images["perceptibility_map"] = plots.plot_attention_map(
            routing_faces.mean(axis=0),
            ri_pictures["attention"],
            os.path.join(out, "perceptibility_map.png"),
        )
    if erc_curves:
        images["error_vs_reject"] = plots.plot_error_versus_reject(
            erc_curves, fmr, os.path.join(out, "error_vs_reject.png")
        )
    drawable = {n: s for n, s in routing.items() if round(np.sqrt(len(s))) ** 2 == len(s)}
    if drawable:
        images["routing_map"] = plots.plot_routing_maps(
            routing_faces.mean(axis=0), drawable, os.path.join(out, "routing_map.png")
        )
        grid = {
            name: {
                **summaries[name],
                "first_choice_expert": np.argmax(s, axis=1)
                .reshape(round(np.sqrt(len(s))), -1)
                .tolist(),
                "first_choice_share": np.round(np.max(s, axis=1), 4).tolist(),
            }
            for name, s in drawable.items()
        }
        with open(os.path.join(out, "routing.json"), "w") as f:
            json.dump({"step": int(step), "faces": len(routing_faces), "layers": grid}, f, indent=2)
    if images:
        writer.write_images(step, {f"eval/{k}": v[None] for k, v in images.items()})
