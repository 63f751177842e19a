"""Files under a workdir: one path abstraction, metric writers, TensorFlow kept quiet.

Every file the train loop reads or writes under a workdir goes through `workdir_path()`, an
`etils.epath.Path` (the abstraction Orbax uses): a local folder becomes an absolute path, a URL
(`gs://bucket/run`, `s3://...`, any scheme epath knows) stays a URL, so no local directory is
ever created from a URL.

metrics.jsonl holds one JSON object per logged step: {"step": 100, "train/loss": 3.2, ...}, so a
run can be read with nothing but the standard library. Scalars written for the same step by
several writers (the loss line, clu's progress report, the evaluation) are merged into that
step's one object; after a resume the rows of steps past the restored checkpoint are dropped,
so no step appears twice. Only process 0 writes.

TensorFlow is only a helper of clu's TensorBoard writer (and of TFDS): it is imported lazily,
hidden from the accelerators and silenced, so a run's stderr holds only our lines.
"""

import json
import os
from typing import Any, Mapping

import numpy as np
from etils import epath

from facemoe_jax.core.paths import (
    _stderr_silenced,
    import_tensorflow_quietly,
    is_remote,
    workdir_path,
)


def _clu_metric_writers():
    import_tensorflow_quietly()
    with _stderr_silenced():
        from clu import metric_writers
    return metric_writers


def report_progress(num_train_steps: int, writer, every_secs: float = 30.0):
    import_tensorflow_quietly()
    from clu import periodic_actions

    return periodic_actions.ReportProgress(
        num_train_steps=num_train_steps, writer=writer, every_secs=every_secs
    )


class JsonlWriter:
    """metrics.jsonl: one object per step, rows merged per step, resumable.

    `resume_step`: rows of later steps (written after the checkpoint a resumed run restarts
    from) are dropped. Local files are appended to (the last row rewritten in place when more
    scalars of its step arrive); remote files (which cannot be appended to) are rewritten
    whole at each write.
    """

    def __init__(self, path, resume_step: int | None = None):
        self.path = epath.Path(path)
        self._local = not is_remote(self.path)
        rows = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a kill mid-write
                    continue
                if isinstance(row, dict) and "step" in row:
                    rows.append(row)
        kept = [r for r in rows if resume_step is not None and r["step"] <= resume_step]
        if resume_step is None:
            kept = rows
        merged: dict[int, dict] = {}
        for row in kept:
            merged.setdefault(int(row["step"]), {}).update(row)
        self._rows = [merged[s] for s in sorted(merged)]
        self._file = None
        if self.path.exists() and len(self._rows) != len(rows) or not self._local:
            self._rewrite()
        if self._local:
            self._file = open(os.fspath(self.path), "a+", encoding="utf-8")
            self._file.seek(0, os.SEEK_END)
            self._last_offset = None

    def _rewrite(self):
        text = "".join(json.dumps(r) + "\n" for r in self._rows)
        if self._local:
            tmp = epath.Path(os.fspath(self.path) + ".tmp")
            tmp.write_text(text)
            os.replace(os.fspath(tmp), os.fspath(self.path))
        else:
            self.path.write_text(text)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        step = int(step)
        if self._rows and self._rows[-1]["step"] == step:
            self._rows[-1].update(values)
            same_step = True
        else:
            self._rows.append({"step": step, **values})
            same_step = False
        if not self._local:
            self._rewrite()
            return
        if same_step and self._last_offset is not None:
            self._file.seek(self._last_offset)
            self._file.truncate()
        elif same_step:  # the last row came from before this process: rewrite the file
            self._file.close()
            self._rewrite()
            self._file = open(os.fspath(self.path), "a+", encoding="utf-8")
            self._file.seek(0, os.SEEK_END)
            self._last_offset = None
            return
        self._last_offset = self._file.tell()
        self._file.write(json.dumps(self._rows[-1]) + "\n")
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

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        if self._file is not None:
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _tensorboard_supported(workdir: str) -> bool:
    # TensorFlow's file systems: local and gs:// (others need TF plug-ins we do not ship).
    return not is_remote(workdir) or workdir.startswith("gs://")


def make_writer(workdir: str, resume_step: int | None = None):
    """Process 0: logging + TensorBoard + metrics.jsonl; other processes: logging only."""
    import jax

    metric_writers = _clu_metric_writers()
    if jax.process_index() > 0:
        return metric_writers.create_default_writer(just_logging=True)
    path = workdir_path(workdir)
    writers = [JsonlWriter(path / "metrics.jsonl", resume_step)]
    if _tensorboard_supported(os.fspath(path)):
        with _stderr_silenced():
            writers.insert(
                0, metric_writers.create_default_writer(os.fspath(path), asynchronous=False)
            )
    else:
        writers.insert(0, metric_writers.create_default_writer(just_logging=True))
    return metric_writers.MultiWriter(writers)
