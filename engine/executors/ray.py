"""The Ray executor: the encode stage over a Ray cluster, writing what the local executor writes.

::

    shard plan (driver) ──from_items──▶ decode: CPU tasks (``num_cpus=cpus_for_decode``)
        ──(K, S, S, 3) uint8, or JPEG bytes──▶ encode + label: actor pool, one actor per GPU (or per CPU
        slot), model and class side loaded once per actor ──▶ SHARDS/shard-NNNNNN-<digest>.npz (committed
        atomically)
        ──▶ driver gathers by item key → embeddings.npy, items.parquet, skipped.parquet, model.json
            (+ metadata.parquet, metadata_naive.parquet when asked to annotate in the pass)

Where JPEGs are decoded follows ``--decode`` (:func:`clipengine.encode.gpu_decode.plan_decode`): with GPU
actors, ``auto`` has the decode tasks only read the files and decode what is not a plain JPEG
(:func:`clipengine.encode.gpu_decode.prepare_range`), and each actor decodes the JPEGs on its own GPU
(:func:`clipengine.encode.gpu_decode.finish_range`): compressed bytes travel, not pixels. Ray gives each GPU
actor its GPU (``CUDA_VISIBLE_DEVICES``), so an actor's device is "cuda" and ``--device cuda:N`` is refused.

The gathered files are those of :func:`clipengine.encode.stage.encode_items` (same rows in the same item
order, same ``model.json``, same finished-set marker), so either executor resumes or extends the other's
finished output directory. With ``annotation`` (an :class:`clipengine.executors.InPassAnnotation`),
each actor also labels its shard's rows right after encoding them (:mod:`clipengine.executors.labels`)
and the driver writes the metadata files the annotate stage would write.

Shards are consecutive items, ``items_per_shard`` each; a shard file's name carries a digest of its
items' keys and holds ``keys`` (K,) str, ``rows`` (K, D) float32, the skipped keys with their reasons,
the label arrays and the model identity. They live in ``shards`` — ``RUN/shards-ray`` or any folder or
URI pyarrow opens (``s3://``, ``gs://``, ``hdfs://``, ``file://``; :mod:`clipengine.shards`),
read and written by the workers and the driver alike; the final files land in the local ``out_dir``.
They are the checkpoint: a restarted job over the same items runs only the shards without a file.

Faults: a decode task or an actor whose process dies is retried by Ray Data (an actor is restarted
and its shard retried); every attempt at a shard is counted in the shard folder, and the attempt after
``max_retries`` retries fails the job with :class:`ShardFailed` naming the shard — on every Ray version,
whatever Ray Data's own retry defaults (unbounded for system failures). A shard is committed once,
atomically, and gathered by key, so a retry never loses or duplicates a row. A bad image is skipped
with the reason the local pipeline gives (:class:`clipengine.encode.decode.SkippedImage`).

The gather streams shard by shard into a memory-mapped ``embeddings.npy``: the driver holds the
item keys and the (N, A) labels, never all N × D rows.

Every worker must read the image files, and reach the shard folder: the default ``RUN/shards-ray``
only on one machine or a shared mount; on a cluster without one, give a URI (``--ray-shards``).
Needs the ``clipengine[ray]`` extra (``ray[data]``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipengine import artifacts
from clipengine.encode.encoders import encoder_record
from clipengine.errors import ClipengineError
from clipengine.interrupts import kept_sigterm_handler
from clipengine.shards import (
    ShardIndex,
    ShardStore,
    open_filesystem,
    plan_shards,
)

DEFAULT_ITEMS_PER_SHARD = 256  # (256, 224, 224, 3) uint8 = 38 MB of pixels in flight per shard
DEFAULT_CPUS_FOR_DECODE = 1.0
DEFAULT_CPUS_PER_WORKER = 1.0  # an encoder actor's CPUs (its torch threads) on CPU-only clusters
DEFAULT_MAX_RETRIES = 3  # retries of a shard whose worker died, per stage (decode, encode)
SHARDS_OPTION = "--ray-shards"  # how messages name the shard location
INSTALL_HINT = "pip install 'clipengine[ray]'  (that is: pip install 'ray[data]>=2.9')"


class ShardFailed(RuntimeError):
    """A shard could not be encoded: its worker died on every allowed attempt, or the encoder raised."""


def import_ray():
    """The ``ray`` module (with Ray Data), or a ``ClipengineError`` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ClipengineError(f"--executor ray needs Ray, which is not installed; install it with: {INSTALL_HINT}") from None
    return ray


# ---- the executor -------------------------------------------------------------------------------
def encode_items(
    items,
    out_dir: str | os.PathLike,
    config,
    *,
    encoder=None,
    address: str | None = None,
    gpus_per_worker: float | None = None,
    cpus_for_decode: float = DEFAULT_CPUS_FOR_DECODE,
    cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER,
    num_workers: int | None = None,
    items_per_shard: int = DEFAULT_ITEMS_PER_SHARD,
    max_retries: int = DEFAULT_MAX_RETRIES,
    shards: str | os.PathLike | None = None,
    annotation=None,
    encoder_factory: Callable[[Any], Any] | None = None,
):
    """Encode ``items`` into ``out_dir`` on a Ray cluster; same arguments, files and
    ``EncodeResult`` as :func:`clipengine.encode.stage.encode_items`.

    Ray options: ``address`` of the cluster (None: the one this process is connected to, else
    ``RAY_ADDRESS`` or a new local one, shut down at the end); ``gpus_per_worker`` GPUs per encoder
    actor (None: 1 when the cluster has GPUs, else 0 = CPU actors of ``cpus_per_worker`` CPUs);
    ``num_workers`` encoder actors (None: every GPU, or every CPU slot left after one decode task);
    ``cpus_for_decode`` CPUs per decode task; ``items_per_shard`` items per shard file (the unit of
    retry and resume); ``max_retries`` retries of a shard whose worker died, per stage, before the job
    fails with :class:`ShardFailed`; ``shards`` the shard folder, a path or a pyarrow filesystem URI
    (None: ``out_dir/shards-ray``); ``annotation`` an :class:`clipengine.executors.InPassAnnotation`:
    the actors label each shard too and the metadata files are written next to the encode outputs.

    ``encoder``: used only for its ``model_record`` (which model the rows must come from); actors
    build their own with ``encoder_factory(config)`` (default :func:`clipengine.encode.encoders.create_encoder`,
    a picklable callable) once each and must report the same model identity.
    """
    from clipengine.devices import parse_device
    from clipengine.encode.gpu_decode import check_decode_choice
    from clipengine.encode.stage import check_output_dtype

    started = time.perf_counter()
    ray = import_ray()
    check_output_dtype(config.output_dtype)
    check_decode_choice(config.decode, config.exact_decode)
    for device in {config.device, *(() if annotation is None else (annotation.config.device,))}:
        if parse_device(device)[1] is not None:
            raise ClipengineError(f"--device {device} with --executor ray: Ray gives each worker its own GPU (as "
                                  "cuda); use --device cuda or auto, and pick the GPUs Ray may use with "
                                  "CUDA_VISIBLE_DEVICES when the cluster starts")
    if items_per_shard < 1:
        raise ClipengineError(f"items_per_shard must be ≥ 1, got {items_per_shard}")
    if cpus_for_decode <= 0 or cpus_per_worker <= 0:
        raise ClipengineError("--cpus-for-decode and CPUs per worker must be > 0")
    if max_retries < 0:
        raise ClipengineError(f"max_retries must be ≥ 0, got {max_retries}")
    keys = artifacts.check_items(items)
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    location = str(shards) if shards is not None else str(out_dir / artifacts.RAY_SHARDS_DIR)
    open_filesystem(location, SHARDS_OPTION)  # an unknown scheme or missing driver fails before the cluster starts
    if encoder_factory is None:
        from clipengine.encode.encoders import create_encoder as encoder_factory

    with _connected(ray, address):
        resources = plan_resources(ray.cluster_resources(), gpus_per_worker=gpus_per_worker,
                                   cpus_per_worker=cpus_per_worker, cpus_for_decode=cpus_for_decode,
                                   num_workers=num_workers)
        record = (encoder_record(encoder) if encoder is not None
                  else _probe_model(ray, config, encoder_factory, resources))
        record.update(dtype=config.output_dtype)
        identity = artifacts.identity_of(record)
        store = ShardStore(location, identity, option=SHARDS_OPTION).open()
        labeller = None
        if annotation is not None:
            from clipengine.executors.labels import prepare_labeller

            labeller = prepare_labeller(annotation, record, config.output_dtype)
        return _run(ray, items, keys, out_dir, config, record, resources, encoder_factory, store,
                    labeller, items_per_shard=items_per_shard, max_retries=max_retries, started=started)


def _run(ray, items, keys, out_dir, config, record, resources, factory, store, labeller, *,
         items_per_shard, max_retries, started):
    from clipengine.encode.geometry import ImageSpec
    from clipengine.encode.stage import EncodeResult
    from clipengine.progress import progress_bar

    plan = plan_shards(keys, items_per_shard)
    files = [os.path.abspath(f) for f in artifacts.item_files(items)]
    boxes = items["box"].to_list() if "box" in items.columns else None
    stats = artifacts.file_stats(files)  # (N, 2) size, mtime_ns: rows of files rewritten since are encoded again
    previous = artifacts.read_finished(out_dir, store.identity, keys, stats)  # memory-mapped rows of a finished run

    finished: dict[str, ShardIndex] = {}  # shard name -> its keys and skips (rows stay on disk)
    tasks = []  # one row per shard still to encode
    todo_items = 0
    committed = store.names()
    for _number, name, positions in plan:
        index = store.index(name) if name in committed else None
        if index is not None and index.files_unchanged(keys, stats, positions):
            finished[name] = index
            continue
        if index is not None:
            store.remove(name)  # a file of it was rewritten since it was encoded: redo the shard
        todo = [i for i in positions if keys[i] not in previous.rows]
        if todo:
            payload = {"keys": [keys[i] for i in todo], "files": [files[i] for i in todo],
                       "boxes": None if boxes is None else [boxes[i] for i in todo],
                       "stats": stats[todo].tolist()}
            tasks.append({"name": name, "payload": json.dumps(payload)})
            todo_items += len(todo)
    reused = sum(1 for key in keys if key in previous.rows) + sum(
        sum(1 for key in index.keys if key not in previous.rows) for index in finished.values())

    spec = ImageSpec.from_preprocess_cfg(record.get("preprocess") or {"size": record["image_size"]},
                                         fast_jpeg=not config.exact_decode)
    decoder = plan_worker_decode(config, record, resources)
    record[artifacts.RECORD_DECODE] = decoder.describe()
    newly = 0
    if tasks:
        store.prepare()
        job = {"store": store.args(), "job": uuid.uuid4().hex[:12], "max_attempts": max_retries + 1}
        bar = progress_bar(todo_items, "encode (ray)", enabled=config.progress, unit="img")
        try:
            with _quiet_ray_data(ray), _bounded_actor_init(ray, max_retries):
                dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks))
                dataset = dataset.map(
                    decode_shard,
                    fn_kwargs={"spec": spec, "box_margin": config.box_margin, "max_pixels": config.max_pixels,
                               "job": job, "on_device": decoder.where == "device"},
                    num_cpus=resources["cpus_for_decode"],
                )
                dataset = dataset.map(
                    ShardEncoder,
                    fn_constructor_kwargs={"config": config, "factory": factory, "job": job,
                                           "batch_size": config.batch_size, "spec": spec,
                                           # shipped once: every actor gets the same object
                                           "labeller": None if labeller is None else ray.put(labeller)},
                    compute=ray.data.ActorPoolStrategy(size=min(resources["num_workers"], len(tasks))),
                    num_cpus=resources["cpus_per_worker"],
                    num_gpus=resources["gpus_per_worker"],
                    runtime_env={"env_vars": {"CLIPENGINE_NUM_THREADS": str(resources["threads_per_worker"])}},
                )
                for row in dataset.iter_rows():
                    newly += int(row["encoded"])
                    bar.update(int(row["encoded"]) + int(row["skipped"]))
        except Exception as error:
            _raise_cause(error)
            raise
        finally:
            bar.close()
        for task in tasks:
            index = store.index(task["name"])
            if index is None:  # the pipeline reported every shard done: its file must be there
                raise RuntimeError(f"{store.location}/{task['name']}: missing after the Ray pipeline finished")
            finished[task["name"]] = index

    encoded, skipped = _gather(items, keys, out_dir, config, record, plan=plan, previous=previous, store=store,
                               finished=finished, labeller=labeller, stats=stats)
    store.clear()
    return EncodeResult(out_dir=out_dir, encoded=encoded, skipped=skipped, newly_encoded=newly, reused=reused,
                        seconds=time.perf_counter() - started, model_record=record)


def _gather(items, keys, out_dir: Path, config, record: dict, *, plan, previous, store: ShardStore,
            finished: dict, labeller, stats: np.ndarray) -> tuple[int, int]:
    """Write the encode outputs (:func:`clipengine.artifacts.write_encoded`) from the shard files and
    the previous finished set, rows streamed shard by shard so the driver never holds all N × D rows.
    With a ``labeller``, the shards' labels are gathered alongside (rows without any are labelled
    here) and the metadata files written. Returns (encoded, skipped) counts."""
    encoded: list[int] = []
    skipped: list[tuple[int, str]] = []
    for _number, name, positions in plan:
        index = finished.get(name)
        encoded_here = set(index.keys) if index is not None else set()
        for i in positions:
            key = keys[i]
            if key in previous.rows or key in encoded_here:
                encoded.append(i)
            elif index is not None and key in index.skipped:
                skipped.append((i, index.skipped[key]))

    gather = None
    if labeller is not None:
        from clipengine.executors.labels import LabelGather

        gather = LabelGather(labeller, len(encoded))

    def blocks():
        row = 0
        cursor = 0
        for _number, name, positions in plan:
            shard = store.read(name) if name in finished else None
            if name in finished and shard is None:
                raise RuntimeError(f"{store.location}/{name}: vanished before the gather")
            position = {key: i for i, key in enumerate(shard["keys"].tolist())} if shard is not None else {}
            rows = []
            while cursor < len(encoded) and encoded[cursor] < positions.stop:
                key = keys[encoded[cursor]]
                if key in previous.rows:
                    rows.append(previous.embeddings[previous.rows[key]])
                else:
                    rows.append(shard["rows"][position[key]])
                    if gather is not None:
                        gather.take(row, shard, position[key])
                row += 1
                cursor += 1
            if rows:
                yield np.stack(rows).astype(np.float32, copy=False)

    artifacts.write_encoded(out_dir, items, encoded=encoded, blocks=blocks(), skipped=skipped, stats=stats,
                            record=record, dtype=config.output_dtype)
    if gather is not None:
        gather.finish(np.load(out_dir / artifacts.EMBEDDINGS, mmap_mode="r", allow_pickle=False))
        gather.write(out_dir, items[encoded] if encoded else items.clear())
    return len(encoded), len(skipped)


# ---- cluster and resources ----------------------------------------------------------------------
@contextlib.contextmanager
def _connected(ray, address: str | None):
    """Use the cluster this process is connected to, or connect (``address``/``RAY_ADDRESS``/a new
    local cluster) and disconnect at the end."""
    if ray.is_initialized():
        yield
        return
    with kept_sigterm_handler():
        try:
            ray.init(address=address, include_dashboard=False, logging_level="WARNING")
        except ConnectionError as error:
            raise ClipengineError(f"--ray-address {address}: cannot connect to a Ray cluster ({error})") from None
    try:
        yield
    finally:
        ray.shutdown()


def plan_resources(cluster: dict, *, gpus_per_worker: float | None, cpus_per_worker: float,
                   cpus_for_decode: float, num_workers: int | None) -> dict:
    """Encoder actors and their resources for a cluster of ``cluster`` (``ray.cluster_resources()``).

    GPU clusters: one actor per ``gpus_per_worker`` GPUs (each also takes 1 CPU); CPU-only clusters:
    actors of ``cpus_per_worker`` CPUs, as many as fit beside one decode task. Raises
    ``ClipengineError`` when the actors and one decode task cannot run at once (the job would hang).
    """
    gpus = float(cluster.get("GPU", 0.0))
    cpus = float(cluster.get("CPU", 0.0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if gpus_per_worker < 0:
        raise ClipengineError(f"--gpus-per-worker must be ≥ 0, got {gpus_per_worker}")
    if num_workers is not None and num_workers < 1:
        raise ClipengineError(f"--ray-workers must be ≥ 1, got {num_workers}")
    if gpus_per_worker > 0:
        if gpus < gpus_per_worker:
            raise ClipengineError(f"--gpus-per-worker {gpus_per_worker:g}: the Ray cluster has {gpus:g} GPU(s)")
        actor_cpus = 1.0
        workers = num_workers or max(1, int(gpus // gpus_per_worker))
        if workers * gpus_per_worker > gpus:
            raise ClipengineError(f"--ray-workers {workers} × --gpus-per-worker {gpus_per_worker:g} "
                                  f"needs more than the cluster's {gpus:g} GPU(s)")
    else:
        actor_cpus = float(cpus_per_worker)
        workers = num_workers or max(1, int((cpus - cpus_for_decode) // actor_cpus))
    if workers * actor_cpus + cpus_for_decode > cpus:
        raise ClipengineError(
            f"{workers} encoder worker(s) × {actor_cpus:g} CPU + {cpus_for_decode:g} CPU for decoding needs more than "
            f"the Ray cluster's {cpus:g} CPUs; lower --ray-workers or --cpus-for-decode"
        )
    return {"num_workers": int(workers), "gpus_per_worker": float(gpus_per_worker), "cpus_per_worker": actor_cpus,
            "cpus_for_decode": float(cpus_for_decode), "threads_per_worker": max(1, math.ceil(actor_cpus))}


@contextlib.contextmanager
def _quiet_ray_data(ray):
    """Our own progress bar instead of Ray Data's, and only its warnings (all restored afterwards)."""
    import logging
    import warnings

    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.")
        context = ray.data.DataContext.get_current()
        names = ("enable_progress_bars", "print_on_execution_start")
        saved = {name: getattr(context, name) for name in names if hasattr(context, name)}
        for name in saved:
            setattr(context, name, False)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(context, name, value)
            logger.setLevel(level)


@contextlib.contextmanager
def _bounded_actor_init(ray, max_retries: int):
    """An encoder actor that dies while loading the model (before any shard) is not counted by the
    shards' attempts: bound it with Ray Data's ``max_consecutive_actor_init_deaths`` where the version
    has it (restored afterwards). Retries of shards are bounded by :meth:`ShardStore.count_attempt`,
    which needs no Ray setting (Ray Data's remote-argument retry bounds are deprecated in 2.60 and
    gone in 2.64; its defaults retry a dying worker without end)."""
    context = ray.data.DataContext.get_current()
    name = "max_consecutive_actor_init_deaths"
    if not hasattr(context, name):
        yield
        return
    saved = getattr(context, name)
    setattr(context, name, max_retries)
    try:
        yield
    finally:
        setattr(context, name, saved)


def _raise_cause(error: Exception) -> None:
    """Re-raise the one-line error a worker raised (``ClipengineError``, :class:`ShardFailed`) without
    Ray's wrapping and remote traceback; other errors are left to the caller."""
    from ray.exceptions import RayError

    seen, pending = set(), [error]
    while pending:  # RayTaskError → .cause (UserCodeException) → __cause__ (what the worker raised) …
        cause = pending.pop()
        if cause is None or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, RayError):  # also Ray's dual-class wrappers of our errors: look inside
            pass
        elif isinstance(cause, ClipengineError):
            raise ClipengineError(str(cause).strip().splitlines()[0]) from None
        elif isinstance(cause, ShardFailed):
            raise ShardFailed(str(cause).strip().splitlines()[0]) from None
        pending += [getattr(cause, "cause", None), cause.__cause__]
    for line in str(error).splitlines():  # Ray Data 2.60 sends only the text of the remote traceback
        for kind in (ClipengineError, ShardFailed):
            prefix = f"{kind.__module__}.{kind.__name__}: "
            if line.startswith(prefix):
                raise kind(line[len(prefix):]) from None


def _check_attempts(job: dict, stage: str, name: str) -> ShardStore:
    """Count this attempt at ``stage`` of shard ``name``; :class:`ShardFailed` past the job's bound."""
    store = ShardStore(*job["store"])
    attempts = store.count_attempt(job["job"], stage, name)
    if attempts > job["max_attempts"]:
        raise ShardFailed(f"shard {name}: its {stage} worker died {attempts - 1} times (retries allowed: "
                          f"{job['max_attempts'] - 1}); giving up — the Ray worker logs say why (memory?)")
    return store


def _probe_model(ray, config, factory, resources: dict) -> dict:
    """The model record as the actors will see it: one task with an actor's resources loads the
    model once (backend and precision depend on the worker's device, not the driver's)."""
    # no runtime_env of its own: a warm pooled worker (torch already imported) can take it
    probe = ray.remote(describe_encoder).options(num_cpus=resources["cpus_for_decode"],
                                                 num_gpus=resources["gpus_per_worker"])
    try:
        return ray.get(probe.remote(config, factory))
    except Exception as error:
        _raise_cause(error)
        raise


def describe_encoder(config, factory) -> dict:
    """``factory(config)``'s model record (with ``embed_dim`` and ``image_size``)."""
    return encoder_record(factory(config))


def plan_worker_decode(config, record: dict, resources: dict):
    """Where the job's JPEGs are decoded (a :class:`clipengine.encode.gpu_decode.DecodePlan`): on the actors'
    device for ``--decode device``, and for ``auto`` when the actors have GPUs and ``--exact-decode`` is off;
    else in the decode tasks (PIL)."""
    from clipengine.encode.gpu_decode import DecodePlan

    device = str(record.get("device", "cpu"))
    on_device = config.decode == "device" or (
        config.decode == "auto" and resources["gpus_per_worker"] > 0 and not config.exact_decode)
    if on_device:
        return DecodePlan("device", device=device, keep_on_device=True, shown=device)
    return DecodePlan("cpu", exact=config.exact_decode)


# ---- what runs on the workers -------------------------------------------------------------------
def decode_shard(row: dict, *, spec, box_margin: float, max_pixels: int, job: dict, on_device: bool = False) -> dict:
    """Ray task: one shard's files → ``decoded``: a pickled :class:`clipengine.encode.pipeline.Batch` of
    (K, S, S, 3) uint8 pixels and skip records (PIL, in this task's own thread), or with ``on_device`` a pickled
    :class:`clipengine.encode.gpu_decode.PreparedRange` (JPEG bytes, the other formats' pixels) that the
    actor finishes on its device."""
    from clipengine.encode.gpu_decode import prepare_range
    from clipengine.encode.pipeline import iter_batches

    _check_attempts(job, "decode", row["name"])

    payload = json.loads(row["payload"])
    files, boxes = payload["files"], payload["boxes"]
    if on_device:
        decoded = prepare_range(files, boxes, 0, spec, box_margin, max_pixels)
    else:
        decoded = next(iter(iter_batches(files, boxes, spec, batch_size=len(files), workers=0,
                                         box_margin=box_margin, max_pixels=max_pixels)))
    return {"name": row["name"], "payload": row["payload"], "decoded": pickle.dumps(decoded, protocol=5)}


class ShardEncoder:
    """Ray actor: loads the model once (``factory(config)``) and takes the labeller once, then per
    shard finishes decoding on its device when the decode task left JPEG bytes, encodes the pixels in
    batches of ``batch_size``, labels the rows and commits the shard. Ray runs one call of an actor at a
    time, so its device work (decode, CUDA graphs) comes from one thread."""

    def __init__(self, config, factory, job: dict, batch_size: int, spec=None, labeller=None):
        import ray

        self.spec = spec
        self.config = config
        self.encoder = factory(config)
        self.store = ShardStore(*job["store"])
        loaded = artifacts.identity_of(encoder_record(self.encoder))
        if loaded != self.store.identity:
            raise ClipengineError(f"a Ray worker loaded model {loaded}, not "
                                  f"{self.store.identity} as the job's first worker did; give every worker the same "
                                  "kind of device")
        self.job = job
        self.batch_size = max(1, int(batch_size))
        self.labeller = ray.get(labeller) if isinstance(labeller, ray.ObjectRef) else labeller

    def __call__(self, row: dict) -> dict:
        from clipengine.encode.gpu_decode import PreparedRange, finish_range

        name = row["name"]
        _check_attempts(self.job, "encode", name)
        payload = json.loads(row["payload"])
        batch = pickle.loads(row["decoded"])
        if isinstance(batch, PreparedRange):
            device = getattr(self.encoder, "tensor_device", None) or str(getattr(self.encoder, "model_record", {}).get("device", "cpu"))
            batch = finish_range(batch, self.spec, device, box_margin=self.config.box_margin,
                                 max_pixels=self.config.max_pixels,
                                 to_numpy=getattr(self.encoder, "tensor_device", None) != device)
        indices = batch.indices.tolist()
        keys = [payload["keys"][i] for i in indices]
        stats = [payload["stats"][i] for i in indices]
        skipped = [[payload["keys"][i], reason] for i, reason in batch.skipped]
        images, count = batch.images, len(indices)
        try:
            parts = [np.asarray(self.encoder.encode_images(images[start:start + self.batch_size]), np.float32)
                     for start in range(0, count, self.batch_size)]  # each (B, D) float32, L2-normalized
        except Exception as error:
            first = (str(error).strip().splitlines() or [""])[0]
            raise ShardFailed(f"shard {name}: encoding failed: {type(error).__name__}: {first}") from None
        rows = np.concatenate(parts) if parts else np.zeros((0, self.store.identity["embed_dim"]), np.float32)
        arrays = {
            "keys": np.asarray(keys, dtype=str).reshape(len(keys)),
            "rows": rows,
            "stats": np.asarray(stats, np.int64).reshape(len(keys), 2),
            "skipped_keys": np.asarray([k for k, _ in skipped], dtype=str).reshape(len(skipped)),
            "skipped_reasons": np.asarray([r for _, r in skipped], dtype=str).reshape(len(skipped)),
        }
        if self.labeller is not None:
            arrays.update(self.labeller.label(rows), labels_key=np.asarray(self.labeller.key))
        self.store.write(name, arrays)
        return {"name": name, "encoded": count, "skipped": len(skipped)}


__all__ = [
    "DEFAULT_ITEMS_PER_SHARD",
    "ShardFailed",
    "ShardIndex",
    "ShardStore",
    "decode_shard",
    "encode_items",
    "import_ray",
    "plan_resources",
    "plan_shards",
]
