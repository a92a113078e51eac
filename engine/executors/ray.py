"""The Ray executor: the encode stage over a Ray cluster, writing what the local executor writes.

::

    shard plan (driver) ──from_items──▶ decode: CPU tasks (``num_cpus=cpus_for_decode``), retried
        ──(K, S, S, 3) uint8──▶ encode: actor pool, one actor per GPU (or per CPU slot), model loaded
        once per actor ──▶ RUN/shards-ray/shard-NNNNNN-<digest>.npz (atomic)
        ──▶ driver gathers by item key → embeddings.npy, items.parquet, skipped.parquet, model.json

The gathered files are those of :func:`clipengine.encode.encode_items` (same rows in the same item
order, same ``model.json``, same finished-set marker), so either executor resumes or extends the other's
finished output directory.

Shards are consecutive items, ``items_per_shard`` each; a shard file's name carries a digest of its
items' keys and holds ``keys`` (K,) str, ``rows`` (K, D) float32, the skipped keys with their reasons
and the model identity. They are the checkpoint: a restarted job over the same items runs only the
shards without a file. Faults: a decode task whose process dies is retried (``max_retries``); an actor
that dies is restarted (``max_restarts``) and its shard retried (``max_task_retries``); a shard file
is written once, atomically, and gathered by key, so a retry never loses or duplicates a row. A bad
image is skipped with the reason the local pipeline gives (:class:`clipengine.images.SkippedImage`).

The gather streams shard by shard into a memory-mapped ``embeddings.npy``: the driver holds the
item keys, never all N × D rows. Annotation is not part of the pass: the run job's annotate stage
reads the gathered embeddings (an (N, D) · (D, C) product, small next to encoding).

The run directory must be on storage every node sees (one machine, NFS, a mounted bucket).
Needs the ``clipengine[ray]`` extra (``ray[data]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipengine.errors import ClipengineError

DEFAULT_ITEMS_PER_SHARD = 256  # (256, 224, 224, 3) uint8 = 38 MB of pixels in flight per shard
DEFAULT_CPUS_FOR_DECODE = 1.0
DEFAULT_CPUS_PER_WORKER = 1.0  # an encoder actor's CPUs (its torch threads) on CPU-only clusters
DEFAULT_MAX_RETRIES = 3
SHARDS_DIR = "shards-ray"
STATE_FILE = "state.json"
INSTALL_HINT = "pip install 'clipengine[ray]'  (that is: pip install 'ray[data]>=2.9')"


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
    encoder_factory: Callable[[Any], Any] | None = None,
):
    """Encode ``items`` into ``out_dir`` on a Ray cluster; same arguments, files and
    ``EncodeResult`` as :func:`clipengine.encode.encode_items`.

    Ray options: ``address`` of the cluster (None: the one this process is connected to, else
    ``RAY_ADDRESS`` or a new local one, shut down at the end); ``gpus_per_worker`` GPUs per encoder
    actor (None: 1 when the cluster has GPUs, else 0 = CPU actors of ``cpus_per_worker`` CPUs);
    ``num_workers`` encoder actors (None: every GPU, or every CPU slot left after one decode task);
    ``cpus_for_decode`` CPUs per decode task; ``items_per_shard`` items per shard file (the unit of
    retry and resume); ``max_retries`` per decode task, actor restart and shard retry.

    ``encoder``: used only for its ``model_record`` (which model the rows must come from); actors
    build their own with ``encoder_factory(config)`` (default :func:`clipengine.encode.create_encoder`,
    a picklable callable) once each and must report the same model identity.
    """
    import polars as pl

    from clipengine.encode import OUTPUT_DTYPES, check_items, item_keys

    started = time.perf_counter()
    ray = import_ray()
    if config.output_dtype not in OUTPUT_DTYPES:
        raise ClipengineError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {config.output_dtype!r}")
    if items_per_shard < 1:
        raise ClipengineError(f"items_per_shard must be ≥ 1, got {items_per_shard}")
    if cpus_for_decode <= 0 or cpus_per_worker <= 0:
        raise ClipengineError("--cpus-for-decode and CPUs per worker must be > 0")
    check_items(items)
    keys = item_keys(items)
    _check_unique(keys)
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    if encoder_factory is None:
        from clipengine.encode import create_encoder as encoder_factory

    with _connected(ray, address):
        resources = plan_resources(ray.cluster_resources(), gpus_per_worker=gpus_per_worker,
                                   cpus_per_worker=cpus_per_worker, cpus_for_decode=cpus_for_decode,
                                   num_workers=num_workers)
        record = _record_of(encoder) if encoder is not None else _probe_model(ray, config, encoder_factory, resources)
        record.update(dtype=config.output_dtype)
        identity = identity_of(record)
        return _run(ray, pl, items, keys, out_dir, config, record, identity, resources, encoder_factory,
                    items_per_shard=items_per_shard, max_retries=max_retries, started=started)


def _run(ray, pl, items, keys, out_dir, config, record, identity, resources, factory, *, items_per_shard,
         max_retries, started):
    from clipengine.encode import EncodeResult
    from clipengine.images import ImageSpec
    from clipengine.progress import progress_bar

    previous = open_finished(out_dir, identity)  # rows of a previous finished run, memory-mapped
    store = ShardStore(out_dir / SHARDS_DIR, identity)
    plan = plan_shards(keys, items_per_shard)
    files = [os.path.abspath(f) for f in (items["file"] if "file" in items.columns else items["path"]).to_list()]
    boxes = items["box"].to_list() if "box" in items.columns else None

    finished: dict[str, ShardIndex] = {}  # shard name -> its keys and skips (rows stay on disk)
    tasks = []  # one row per shard still to encode
    todo_items = 0
    for _number, name, positions in plan:
        index = store.index(name)
        if index is not None:
            finished[name] = index
            continue
        todo = [i for i in positions if keys[i] not in previous.rows]
        if todo:
            payload = {"keys": [keys[i] for i in todo], "files": [files[i] for i in todo],
                       "boxes": None if boxes is None else [boxes[i] for i in todo]}
            tasks.append({"name": name, "payload": json.dumps(payload)})
            todo_items += len(todo)
    reused = sum(1 for key in keys if key in previous.rows) + sum(
        sum(1 for key in index.keys if key not in previous.rows) for index in finished.values())

    spec = ImageSpec.from_preprocess_cfg(record.get("preprocess") or {"size": record["image_size"]},
                                         fast_jpeg=not config.exact_decode)
    newly = 0
    if tasks:
        store.prepare()
        bar = progress_bar(todo_items, "encode (ray)", enabled=config.progress, unit="img")
        try:
            with _quiet_ray_data(ray):
                task_retries, actor_retries = _retry_options(ray, max_retries)
                dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks))
                dataset = dataset.map(
                    decode_shard,
                    fn_kwargs={"spec": spec, "box_margin": config.box_margin, "max_pixels": config.max_pixels},
                    num_cpus=resources["cpus_for_decode"],
                    **task_retries,
                )
                dataset = dataset.map(
                    ShardEncoder,
                    fn_constructor_kwargs={"config": config, "factory": factory, "identity": identity,
                                           "shard_dir": str(store.folder), "batch_size": config.batch_size},
                    compute=ray.data.ActorPoolStrategy(size=min(resources["num_workers"], len(tasks))),
                    num_cpus=resources["cpus_per_worker"],
                    num_gpus=resources["gpus_per_worker"],
                    runtime_env={"env_vars": {"CLIPENGINE_NUM_THREADS": str(resources["threads_per_worker"])}},
                    **actor_retries,
                )
                for row in dataset.iter_rows():
                    newly += int(row["encoded"])
                    bar.update(int(row["encoded"]) + int(row["skipped"]))
        except Exception as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, ClipengineError):
                raise ClipengineError(str(cause)) from None
            raise
        finally:
            bar.close()
        for task in tasks:
            index = store.index(task["name"])
            if index is None:  # the pipeline reported every shard done: its file must be there
                raise RuntimeError(f"{store.folder / task['name']}: missing after the Ray pipeline finished")
            finished[task["name"]] = index

    encoded, skipped = write_outputs(pl, items, keys, boxes, out_dir, config, record, identity, plan=plan,
                                     previous=previous, store=store, finished=finished)
    store.clear()
    return EncodeResult(out_dir=out_dir, encoded=encoded, skipped=skipped, newly_encoded=newly, reused=reused,
                        seconds=time.perf_counter() - started, model_record=record)


class FinishedRun:
    """A previous finished output set of the same model: ``rows`` key → row number in
    ``embeddings`` ((N, D), memory-mapped). Empty when there is none or it is not trusted."""

    def __init__(self, rows: dict[str, int] | None = None, embeddings: np.ndarray | None = None):
        self.rows = rows or {}
        self.embeddings = embeddings


def open_finished(out_dir: Path, identity: dict) -> FinishedRun:
    """The finished set in ``out_dir`` if its identity matches and ``embeddings.npy`` has the digest
    ``items.parquet`` recorded (the rule of :mod:`clipengine.encode`); rows are not read into memory."""
    import polars as pl

    from clipengine.atomic import read_parquet_metadata
    from clipengine.encode import EMBEDDINGS_FILE, ITEMS_FILE, rows_digest, item_keys

    items_path, emb_path = out_dir / ITEMS_FILE, out_dir / EMBEDDINGS_FILE
    if not (items_path.is_file() and emb_path.is_file()):
        return FinishedRun()
    try:
        meta = read_parquet_metadata(items_path)
        if json.loads(meta.get("clipengine.identity", "{}")) != identity:
            return FinishedRun()
        embeddings = np.load(emb_path, mmap_mode="r", allow_pickle=False)
        if rows_digest(embeddings) != meta.get("clipengine.embeddings_sha256"):
            return FinishedRun()  # a pair from an interrupted finalization: not trusted
        previous = pl.read_parquet(items_path)
    except Exception:  # unreadable leftovers are re-encoded, never trusted
        return FinishedRun()
    keys = item_keys(previous)
    if len(keys) != len(embeddings):
        return FinishedRun()
    return FinishedRun({key: i for i, key in enumerate(keys)}, embeddings)


def write_outputs(pl, items, keys, boxes, out_dir: Path, config, record: dict, identity: dict, *, plan,
                  previous: FinishedRun, store: "ShardStore", finished: dict) -> tuple[int, int]:
    """The finished set, as :func:`clipengine.encode.encode_items` writes it (same files, rows in item
    order, items.parquet last with the digest of embeddings.npy). Rows stream shard by shard from
    the shard files (and the previous finished set) into a memory-mapped ``embeddings.npy``, so the
    driver never holds all N × D rows. Returns (encoded, skipped) counts."""
    from numpy.lib.format import open_memmap

    from clipengine.atomic import atomic_path, write_json, write_parquet
    from clipengine.encode import EMBEDDINGS_FILE, ITEMS_FILE, MODEL_FILE, SKIPPED_FILE, rows_digest

    encoded_index: list[int] = []
    skipped_index: list[int] = []
    reasons: list[str] = []
    for _number, name, positions in plan:
        index = finished.get(name)
        encoded_here = set(index.keys) if index is not None else set()
        for i in positions:
            key = keys[i]
            if key in previous.rows or key in encoded_here:
                encoded_index.append(i)
            elif index is not None and key in index.skipped:
                skipped_index.append(i)
                reasons.append(index.skipped[key])

    with atomic_path(out_dir / EMBEDDINGS_FILE) as tmp:
        embeddings = open_memmap(tmp, mode="w+", dtype=np.dtype(config.output_dtype),
                                 shape=(len(encoded_index), record["embed_dim"]))  # (N, D)
        row = 0
        cursor = 0
        for _number, name, positions in plan:
            shard_rows = store.rows(name) if name in finished else {}
            while cursor < len(encoded_index) and encoded_index[cursor] < positions.stop:
                key = keys[encoded_index[cursor]]
                if key in previous.rows:
                    embeddings[row] = previous.embeddings[previous.rows[key]]
                else:
                    embeddings[row] = shard_rows[key]
                row += 1
                cursor += 1
        embeddings.flush()
        digest = rows_digest(embeddings)
        del embeddings

    skipped_frame = pl.DataFrame(
        {
            "path": [items["path"][i] for i in skipped_index],
            **({"box": [boxes[i] for i in skipped_index]} if boxes is not None else {}),
            "reason": reasons,
        },
        schema={"path": pl.String, **({"box": pl.List(pl.Float64)} if boxes is not None else {}), "reason": pl.String},
    )
    record.update(n_items=len(encoded_index), n_skipped=len(skipped_index))
    write_parquet(out_dir / SKIPPED_FILE, skipped_frame)
    write_json(out_dir / MODEL_FILE, record)
    write_parquet(
        out_dir / ITEMS_FILE,
        items[encoded_index] if encoded_index else items.clear(),
        metadata={"clipengine.embeddings_sha256": digest, "clipengine.identity": json.dumps(identity, sort_keys=True)},
    )
    return len(encoded_index), len(skipped_index)


# ---- cluster and resources ----------------------------------------------------------------------
@contextlib.contextmanager
def _connected(ray, address: str | None):
    """Use the cluster this process is connected to, or connect (``address``/``RAY_ADDRESS``/a new
    local cluster) and disconnect at the end."""
    if ray.is_initialized():
        yield
        return
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
        # the retry bounds below are still "ray_remote_args" until Ray 2.64 (see _retry_options);
        # Ray Data's context warns about its own renamed settings
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.")
        context = ray.data.DataContext.get_current()
        saved = (context.enable_progress_bars, getattr(context, "print_on_execution_start", True))
        context.enable_progress_bars, context.print_on_execution_start = False, False
        try:
            yield
        finally:
            context.enable_progress_bars, context.print_on_execution_start = saved
            logger.setLevel(level)


def _retry_options(ray, max_retries: int) -> tuple[dict, dict]:
    """Bounded retries for decode tasks and encoder actors: a shard that keeps killing its worker
    fails the job after ``max_retries`` instead of looping. Ray Data's own defaults (infinite
    retries of system failures) apply from Ray 2.64 on, where these remote arguments go away."""
    try:
        version = tuple(int(part) for part in ray.__version__.split(".")[:2])
    except ValueError:
        version = (0, 0)
    if version >= (2, 64):
        return {}, {}
    return {"max_retries": max_retries}, {"max_restarts": max_retries, "max_task_retries": max_retries}


def _probe_model(ray, config, factory, resources: dict) -> dict:
    """The model record as the actors will see it: one task with an actor's resources loads the
    model once (backend and precision depend on the worker's device, not the driver's)."""
    # no runtime_env of its own: a warm pooled worker (torch already imported) can take it
    probe = ray.remote(describe_encoder).options(num_cpus=resources["cpus_for_decode"],
                                                 num_gpus=resources["gpus_per_worker"])
    try:
        return ray.get(probe.remote(config, factory))
    except Exception as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, ClipengineError):
            raise ClipengineError(str(cause)) from None
        raise


def describe_encoder(config, factory) -> dict:
    """``factory(config)``'s model record (with ``embed_dim`` and ``image_size``)."""
    return _record_of(factory(config))


def _record_of(encoder) -> dict:
    record = dict(getattr(encoder, "model_record", None) or {"model_id": type(encoder).__name__})
    record.update(embed_dim=int(encoder.embed_dim), image_size=int(encoder.image_size))
    return record


def identity_of(record: dict) -> dict:
    """What must agree for rows to be reused (as in :mod:`clipengine.encode`)."""
    return {"model_id": record.get("model_id"), "precision": record.get("precision"), "embed_dim": record["embed_dim"]}


def _check_unique(keys: list[str]) -> None:
    if len(set(keys)) == len(keys):
        return
    seen: set[str] = set()
    dupes = [key for key in keys if key in seen or seen.add(key)]
    raise ClipengineError(f"items: {len(dupes)} duplicate items (same path and box), e.g. {dupes[0]!r}")


# ---- shards -------------------------------------------------------------------------------------
def plan_shards(keys: list[str], items_per_shard: int) -> list[tuple[int, str, range]]:
    """Consecutive item ranges: (number, file name, positions). The name carries a digest of the
    range's keys, so a shard file is only ever taken for the very same items."""
    plan = []
    for number, start in enumerate(range(0, len(keys), items_per_shard)):
        positions = range(start, min(start + items_per_shard, len(keys)))
        digest = hashlib.sha256("\n".join(keys[i] for i in positions).encode()).hexdigest()[:16]
        plan.append((number, f"shard-{number:06d}-{digest}.npz", positions))
    return plan


class ShardIndex:
    """What a shard file holds, without its rows: ``keys`` of the encoded items (in row order) and
    ``skipped`` key → reason."""

    def __init__(self, keys: list[str], skipped: dict[str, str]):
        self.keys = keys
        self.skipped = skipped


class ShardStore:
    """``RUN/shards-ray/``: ``state.json`` (the model identity) + one ``.npz`` per finished shard.
    Shards of another model are removed on opening."""

    def __init__(self, folder: Path, identity: dict):
        self.folder = Path(folder)
        self.identity = identity
        if self.folder.is_dir():
            try:
                same = json.loads((self.folder / STATE_FILE).read_text(encoding="utf-8")) == identity
            except (OSError, ValueError):
                same = False
            if not same:
                self.clear()

    def prepare(self) -> None:
        from clipengine.atomic import write_json

        if not (self.folder / STATE_FILE).is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / STATE_FILE, self.identity)

    def index(self, name: str) -> ShardIndex | None:
        """The finished shard ``name`` (None when absent, unreadable or of another model)."""
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:  # an .npz reads only the arrays asked for
                if json.loads(str(data["identity"])) != self.identity:
                    return None
                return ShardIndex(data["keys"].tolist(),
                                  dict(zip(data["skipped_keys"].tolist(), data["skipped_reasons"].tolist())))
        except Exception:  # atomic writes make this unreachable; never trust a bad file anyway
            path.unlink(missing_ok=True)
            return None

    def rows(self, name: str) -> dict[str, np.ndarray]:
        """key → (D,) float32 row of the finished shard ``name``."""
        with np.load(self.folder / name, allow_pickle=False) as data:
            return dict(zip(data["keys"].tolist(), np.asarray(data["rows"], np.float32)))

    def clear(self) -> None:
        from clipengine.encode import remove_shard_folder

        remove_shard_folder(self.folder)


def write_shard(path: Path, keys: list[str], rows: np.ndarray, skipped: list[tuple[str, str]], identity: dict) -> None:
    """One finished shard, atomically: ``keys`` (K,), ``rows`` (K, D) float32, skips, identity."""
    from clipengine.atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                keys=np.asarray(keys, dtype=str).reshape(len(keys)),
                rows=np.asarray(rows, np.float32),
                skipped_keys=np.asarray([k for k, _ in skipped], dtype=str).reshape(len(skipped)),
                skipped_reasons=np.asarray([r for _, r in skipped], dtype=str).reshape(len(skipped)),
                identity=np.asarray(json.dumps(identity, sort_keys=True)),
            )


# ---- what runs on the workers -------------------------------------------------------------------
def decode_shard(row: dict, *, spec, box_margin: float, max_pixels: int) -> dict:
    """Ray task: one shard's files → its pixels (bytes of (K, S, S, 3) uint8) and skip records.
    Decoding is :func:`clipengine.images.iter_batches` in this task's own thread."""
    from clipengine.images import iter_batches

    payload = json.loads(row["payload"])
    keys, files, boxes = payload["keys"], payload["files"], payload["boxes"]
    batch = next(iter(iter_batches(files, boxes, spec, batch_size=len(files), workers=0,
                                   box_margin=box_margin, max_pixels=max_pixels)))
    images = np.ascontiguousarray(batch.images, dtype=np.uint8)  # (K, S, S, 3)
    return {
        "name": row["name"],
        "keys": json.dumps([keys[i] for i in batch.indices.tolist()]),
        "skipped": json.dumps([[keys[i], reason] for i, reason in batch.skipped]),
        "count": int(len(batch.indices)),
        "size": int(spec.image_size),
        "images": images.tobytes(),
    }


class ShardEncoder:
    """Ray actor: loads the model once (``factory(config)``), then per shard encodes its pixels in
    batches of ``batch_size`` and writes the shard file."""

    def __init__(self, config, factory, identity: dict, shard_dir: str, batch_size: int):
        self.encoder = factory(config)
        self.identity = identity_of(_record_of(self.encoder))
        if self.identity != identity:
            raise ClipengineError(f"a Ray worker loaded model {self.identity}, not {identity} as the job's first "
                                  "worker did; give every worker the same kind of device")
        self.shard_dir = Path(shard_dir)
        self.batch_size = max(1, int(batch_size))

    def __call__(self, row: dict) -> dict:
        count, size = int(row["count"]), int(row["size"])
        images = np.frombuffer(row["images"], dtype=np.uint8).reshape(count, size, size, 3)
        parts = [np.asarray(self.encoder.encode_images(images[start:start + self.batch_size]), np.float32)
                 for start in range(0, count, self.batch_size)]  # each (B, D) float32, L2-normalized
        rows = np.concatenate(parts) if parts else np.zeros((0, self.identity["embed_dim"]), np.float32)
        skipped = [tuple(pair) for pair in json.loads(row["skipped"])]
        write_shard(self.shard_dir / row["name"], json.loads(row["keys"]), rows, skipped, self.identity)
        return {"name": row["name"], "encoded": count, "skipped": len(skipped)}


__all__ = [
    "DEFAULT_ITEMS_PER_SHARD",
    "ShardStore",
    "decode_shard",
    "encode_items",
    "import_ray",
    "plan_resources",
    "plan_shards",
]
