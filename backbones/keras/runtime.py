"""The Keras family's process set-up: TensorFlow's logs, threads, device, seeds, serving.

The one module of the family that imports Keras and TensorFlow: the others take ``keras`` and
``tf`` from here, so TensorFlow's C++ log level is set, and its load-time lines dropped, before
it loads, whichever module of the family a process imports first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import resource
import sys
import tempfile
from collections.abc import Iterator

import numpy as np

from backbones import FRAMEWORK_LOGS_ENV

# TensorFlow's C++ log level as this module set it, so that a process started from this one
# (which inherits TF_CPP_MIN_LOG_LEVEL) can tell it from a level the user set.
OUR_TF_LOG_LEVEL_ENV = "FOLDSTACK_TF_CPP_MIN_LOG_LEVEL"
# absl's C++ log line (``E0000 00:00:1796610671.275274   11355 cuda_platform.cc:52] ...``) and
# the notice absl prints before its first line when logging is not initialised yet
_CPP_LOG_LINE = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] ")
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}


def tensorflow_log_level() -> int:
    """TensorFlow's C++ log level for this process, set before TensorFlow is imported.

    On a machine without a GPU TensorFlow logs ``E0000 ... failed call to cuInit: INTERNAL: CUDA
    error`` and, per tf.data pipeline, ``E0000 ... NodeDef mentions attribute
    use_unbounded_threadpool``: errors to TensorFlow, noise to a user reading a run. By default
    only fatal lines pass (3); ``-v`` (``FOLDSTACK_FRAMEWORK_LOGS``) shows every line (0); a
    TF_CPP_MIN_LOG_LEVEL the user set is obeyed as it is.
    """
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if level is not None and level != os.environ.get(OUR_TF_LOG_LEVEL_ENV):
        return int(level) if level.strip().isdigit() else 0  # the user's; TensorFlow parses it
    level = "0" if os.environ.get(FRAMEWORK_LOGS_ENV) else "3"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ[OUR_TF_LOG_LEVEL_ENV] = level
    return int(level)


@contextlib.contextmanager
def cpp_log_lines_dropped(min_level: int) -> Iterator[None]:
    """Drop the C++ log lines below ``min_level`` written to stderr inside the block.

    TensorFlow's libraries log while they load (``I0000 ... cudart_stub.cc:31] Could not find
    cuda drivers``, after absl's notice that logging is not initialised), before TensorFlow has
    read TF_CPP_MIN_LOG_LEVEL, so the level cannot hide them. For the import only, file
    descriptor 2 goes to a temporary file; everything else written there (a Python warning, a
    fatal line) is written back to stderr, in order, when the block ends.
    """
    if min_level <= 0:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = []
            for line in sink.read().decode(errors="replace").splitlines(keepends=True):
                cpp = _CPP_LOG_LINE.match(line)
                if not (line.startswith(_ABSL_NOTICE)
                        or (cpp and _SEVERITY[cpp[1]] < min_level)):
                    kept.append(line)
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


if "keras" not in sys.modules:  # a KERAS_BACKEND=torch in the environment must not load torch
    os.environ["KERAS_BACKEND"] = "tensorflow"
with cpp_log_lines_dropped(tensorflow_log_level()):
    import keras
    import tensorflow as tf

from oof.config import RunConfig  # noqa: E402
from oof.errors import ConfigError  # noqa: E402

log = logging.getLogger(__name__)
FRAMEWORK = "tensorflow"

if keras.backend.backend() != "tensorflow":
    raise ConfigError(
        f"keras/ backbones need the TensorFlow backend of Keras, but Keras was imported with "
        f"{keras.backend.backend()!r} (KERAS_BACKEND); unset KERAS_BACKEND"
    )


def versions() -> dict[str, str]:
    return {"tensorflow": tf.__version__, "keras": keras.__version__}


def configure_runtime(cfg: RunConfig) -> tuple[str, str]:
    """Threads, device and precision policy; returns (device, dtype policy)."""
    if cfg.threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, cfg.threads))
        except RuntimeError:  # set before this process's first op, then fixed for good
            raise ConfigError(
                f"--threads {cfg.threads}: TensorFlow in this process already computes on "
                f"{tf.config.threading.get_intra_op_parallelism_threads() or 'its default'} "
                "threads, and the count orders the float sums; train this run in a process of "
                "its own (run_folds.py, or a plan: one worker per thread count)") from None
    # Deterministic kernels where TensorFlow has a choice (GPU reductions, scatter, tf.data's
    # parallel map): the seeds then fix the result on a GPU as they already do on the CPU.
    tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")
    if cfg.device == "cpu" and gpus:
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            log.warning("--device cpu: TensorFlow already uses the GPU in this process")
        gpus = []
    elif cfg.device.startswith("cuda") and not gpus:
        raise ConfigError(f"--device {cfg.device}: TensorFlow sees no GPU")
    keras.mixed_precision.set_global_policy("mixed_float16" if gpus and cfg.amp else "float32")
    return runtime_in_use()


def runtime_in_use() -> tuple[str, str]:
    """(device, dtype policy) this process computes with, as ``configure_runtime`` left them."""
    device = "gpu" if tf.config.get_visible_devices("GPU") else "cpu"
    return device, keras.mixed_precision.global_policy().name


def seed_python(seed: int) -> None:
    """Seed the initial weights of a fold without ``tf.random.set_seed``.

    Keras draws initializer and dropout seeds from Python's ``random``; ``tf.random.set_seed``
    (inside ``keras.utils.set_random_seed``) would clear TensorFlow's caches and force the
    reused training step to be optimised again (measured: 13-15 s per fold on 2 cores). The
    batch order and augmentation are seeded explicitly by ``EpochBatches``.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)


def configure_serving(threads: int | None = None) -> None:
    """Share a process politely: GPU memory grown on demand (so torch can have the rest),
    ``threads`` intra-op threads, float32 weights whatever the run's training policy."""
    for gpu in tf.config.list_physical_devices("GPU"):
        # RuntimeError: the GPU (or the thread pools) are initialised already: settings stay
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    if threads:
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    keras.mixed_precision.set_global_policy("float32")


def rss_mb() -> float:
    """Resident memory now (Linux /proc), else the peak; to check folds do not pile up."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
