"""Metric writers: clu's default writers (logging + TensorBoard) and a plain metrics.jsonl.

metrics.jsonl has one JSON object per written step: {"step": 100, "train/loss": 3.2, ...}, so a
run can be read with nothing but the standard library. Only process 0 writes.
"""

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
    """Appends scalars to `path`, one line per write_scalars call; other kinds are ignored."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def make_writer(workdir: str) -> metric_writers.MetricWriter:
    if jax.process_index() > 0:
        return metric_writers.create_default_writer(just_logging=True)
    return metric_writers.MultiWriter(
        [
            metric_writers.create_default_writer(workdir, asynchronous=False),
            JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
        ]
    )
