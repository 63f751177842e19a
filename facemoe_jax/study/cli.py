"""The study's command line (`python -m facemoe_jax.study --help`): picks a suite, makes its
settings and base config, and runs it. `SUITES` lives here, above both suites' modules, so no
suite imports another.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import ml_collections

from facemoe_jax.core import messages
from facemoe_jax.core.paths import workdir_path
from facemoe_jax.study import lfw, runner, synthetic

SUITES = {suite.name: suite for suite in (synthetic.SYNTHETIC, lfw.LFW, lfw.LFW_VALIDATION)}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m facemoe_jax.study",
        description="Low-resolution adaptation study: every registered recipe from one HR "
        "pre-trained model, with the same budget, seed and evaluation.",
    )
    parser.add_argument("--out", required=True, help="study folder (rows are reused from it)")
    parser.add_argument(
        "--suite",
        default="synthetic",
        choices=sorted(SUITES),
        help="synthetic: the embedded identities, nothing downloaded (default); lfw: real "
        "faces, the ONNX --teacher adapted on LFW View 1's training people; lfw-validation: "
        "the same rows without 20 %% of the training people who have two or more images, "
        "scored on pairs among them "
        "(for choosing settings)",
    )
    parser.add_argument(
        "--config",
        default="configs/demo.py",
        help="synthetic suite: the pre-training config file (default: configs/demo.py)",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="synthetic suite: an existing HR run (workdir) to adapt instead of pre-training",
    )
    parser.add_argument(
        "--lfw",
        default=lfw.DEFAULT_LFW,
        help="lfw suite: the LFW folder (aligned112/, "
        "the pairs and people files; default ../shared/realfaces/lfw)",
    )
    parser.add_argument(
        "--teacher",
        default=lfw.DEFAULT_TEACHER,
        help="lfw suite: the HR model, an ONNX "
        "face recognizer taking (pixel - 127) / 128 (default: the real one in ../shared)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="adaptation seeds (mean ± std)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"adaptation steps per row (default: synthetic {synthetic.StudySettings.steps}, lfw "
        f"{lfw.LfwSettings.steps})",
    )
    parser.add_argument("--recipes", default="", help="comma list (default: all of the suite's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one of the suite's settings (repeatable), e.g. --set learning_rate=5e-4 "
        "(the lfw suites' fields: facemoe_jax.study.lfw.LfwSettings)",
    )
    args = parser.parse_args(argv)
    import jax

    from facemoe_jax.train.hooks import Preempted

    jax.config.update("jax_threefry_partitionable", True)  # as facemoe_jax.main
    suite = SUITES[args.suite]
    try:
        if suite in (lfw.LFW, lfw.LFW_VALIDATION):
            settings = lfw.LfwSettings(lfw_dir=args.lfw, teacher=args.teacher)
            if suite is lfw.LFW_VALIDATION:
                split = os.path.join(str(workdir_path(args.out)), "validation_split")
                settings = dataclasses.replace(settings, validation_dir=split)
            lfw.check_paths(settings)
            base = lfw.base_config(settings)
        else:
            settings, base = synthetic.StudySettings(), load_config(args.config)
        if args.steps is not None:
            settings = dataclasses.replace(settings, steps=args.steps)
        settings = runner.with_settings(settings, args.set)
        recipes = [r.strip() for r in args.recipes.split(",") if r.strip()] or None
        runner.run_study(
            base,
            args.out,
            suite=suite,
            seeds=args.seeds,
            recipes=recipes,
            pretrained=args.pretrained,
            settings=settings,
        )
    except (ValueError, OSError) as e:
        messages.error(e)
        return 2
    except Preempted as e:  # SIGTERM/SIGINT: the running row saved its step; rerun to continue
        messages.say(f"{messages.one_line(e)} (study: run the same study command to continue)")
        return 75
    return 0


def load_config(path: str) -> ml_collections.ConfigDict:
    import importlib.util

    if not os.path.isfile(path):
        raise ValueError(f"--config={path!r} is not a file")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.insert(0, root)  # config files import configs.common
    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
