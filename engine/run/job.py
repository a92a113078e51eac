"""The whole semantic test as one resumable job: a dataset through encode → errors → annotate →
eval → slices → coverage → summary → report, each stage recorded in ``RUN/manifest.json``.

This module only sequences stages (each usable alone, each in its own package) and records them:

| stage | runs | writes (:mod:`clipengine.artifacts`) | its fingerprint covers |
| --- | --- | --- | --- |
| encode | an executor's ``encode_items`` | the encode outputs | item listing (paths, boxes, file sizes and mtimes), model, encode settings |
| errors | the dataset adapter | errors.parquet | the adapter's input files (content), settings and listing |
| annotate | :func:`clipengine.annotate.stage.annotate_run` | metadata.parquet (+ metadata_naive.parquet with ground truth) | encode, schema hash, strategy |
| eval | :func:`clipengine.annotate.evaluate.evaluate_run` | label_quality.csv / .md | annotate, errors |
| slices | :func:`clipengine.slices.find.slice_run` | slices.parquet, slices.json | annotate, errors, slice settings, features |
| coverage | :func:`clipengine.coverage.stage.coverage_run` | coverage.json, coverage.parquet | annotate, errors, coverage settings, the ODD file (content), features |
| summary | :func:`clipengine.run.summary.write_summary` | summary.md | slices, eval, coverage |
| report | :func:`clipengine.report.write_report` | report.html (+ thumbs/) | summary |

A stage runs when its fingerprint differs from the finished one in the manifest (or it never
finished); otherwise it is reused. Encode is incremental (only new items go through the model)
and resumes from its shards after a kill. Every file is written atomically, and a stage is
marked finished only after its outputs exist, so a run killed at any moment (SIGKILL
included) resumes by running the same command again.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from clipengine import artifacts
from clipengine.config import RunConfig
from clipengine.errors import ClipengineError
from clipengine.run.manifest import Manifest, fingerprint, now_iso, package_versions

STAGES = ("encode", "errors", "annotate", "eval", "slices", "coverage", "summary", "report")


@dataclass
class RunResult:
    """What one ``run_job`` did: ``ran`` the stages that worked now, ``reused`` those already done."""

    run_dir: Path
    manifest: dict
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    seconds: float = 0.0


class RunLog:
    """Human lines on stderr (silenced by ``quiet``); JSON lines on stdout with ``log_json``."""

    def __init__(self, *, quiet: bool = False, log_json: bool = False, out=None, err=None):
        self.quiet = quiet
        self.log_json = log_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def event(self, event: str, **fields: Any) -> None:
        if self.log_json:
            record = {"time": now_iso(), "event": event, **fields}
            self.out.write(json.dumps(record, default=str, ensure_ascii=False) + "\n")
            self.out.flush()

    def say(self, message: str) -> None:
        if not self.quiet:
            self.err.write(message + "\n")
            self.err.flush()


class Hooks:
    """Test seams around each stage (the default does nothing): ``before(stage)``,
    ``outputs_written(stage)`` (outputs on disk, manifest not yet updated) and ``after(stage)``."""

    def before(self, stage: str) -> None: ...

    def outputs_written(self, stage: str) -> None: ...

    def after(self, stage: str) -> None: ...


def default_run_dir(dataset: str) -> Path:
    from clipengine.config import DEFAULT_RUNS_DIR

    return DEFAULT_RUNS_DIR / dataset


class _Job:
    def __init__(self, config: RunConfig, *, encoder=None, hooks: Hooks | None = None, log: RunLog | None = None):
        from clipengine.datasets import create_dataset, default_schema

        self.config = config
        self.hooks = hooks or Hooks()
        self.log = log or RunLog(quiet=config.quiet, log_json=config.log_json)
        self.progress = not (config.quiet or config.log_json)
        self.run_dir = Path(config.out) if config.out is not None else default_run_dir(config.dataset)
        self.dataset = create_dataset(config.dataset, config.root, config.data, progress=self.progress)
        self.schema_name = config.schema or default_schema(config.dataset)
        self._encoder = encoder
        self.delivered: list[str] = []  # metadata files the executor wrote in its encode pass
        self.result = RunResult(run_dir=self.run_dir, manifest={})

    # -- stage driver
    def stage(self, name: str, stage_fingerprint: str, work: Callable[[], tuple[list[str], dict]], bar=None) -> None:
        if bar is not None:
            bar.set_description(f"run: {name}")
        if self.manifest.is_done(name, stage_fingerprint):
            self.manifest.mark_skipped(name)
            self.result.reused.append(name)
            self.log.event("stage", stage=name, status="reused")
        else:
            self.hooks.before(name)
            started = self.manifest.start(name, stage_fingerprint)
            self.log.event("stage", stage=name, status="started")
            outputs, info = work()
            self.hooks.outputs_written(name)
            record = self.manifest.finish(name, started, outputs=outputs, info=info)
            self.result.ran.append(name)
            self.log.event("stage", stage=name, status="done", seconds=record["seconds"], **info)
            self.log.say(f"clipengine run: {name} done in {record['seconds']:.1f} s")
            self.hooks.after(name)
        if bar is not None:
            bar.update(1)

    def encoder(self):
        """The encoder (image + text towers), created once per process on first need."""
        if self._encoder is None:
            from clipengine.encode.encoders import create_encoder

            self._encoder = create_encoder(replace(self.config.encode, model=self.model))
        return self._encoder

    def text_encoder(self):
        if self._encoder is not None:
            return self._encoder
        from clipengine.encode.encoders import text_encoder_from_dir

        return text_encoder_from_dir(self.run_dir, device=self.config.encode.device)

    # -- the stages
    def run(self) -> RunResult:
        from clipengine.annotate.schemas import load_schema
        from clipengine.annotate.stage import label_targets
        from clipengine.datasets.base import describe_files, hash_listing
        from clipengine.encode.encoders import choose_model
        from clipengine.progress import progress_bar

        started = time.perf_counter()
        schema_file = Path(self.schema_name)
        odd_file = self.config.coverage.odd
        given = [*self.dataset.input_files(), *([schema_file] if schema_file.is_file() else []),
                 *([odd_file] if odd_file is not None else [])]
        artifacts.check_inputs_kept(self.run_dir, given)
        self.manifest = Manifest(self.run_dir)
        items = self.dataset.list_items()
        listing_hash = hash_listing(items)
        dataset_fp = self.dataset.fingerprint(items)
        self.model, notice = choose_model(self.config, self.manifest.data.get("model_choice"))
        if notice:
            self.result.notices.append(notice)
            self.log.say(notice)
            self.log.event("notice", message=notice)
        schema = load_schema(self.schema_name)
        if self.config.coverage.odd is not None:  # a bad ODD file stops the run before any work
            from clipengine.coverage.odd import load_odd

            load_odd(self.config.coverage.odd)
        features = artifacts.joined_features(schema.attribute_names, self.dataset.error_features())
        self.manifest.update(
            dataset={"name": self.config.dataset, "root": str(self.dataset.root) if self.dataset.root else None,
                     "settings": self.dataset.settings(), "items": items.height,
                     "skipped_inputs": self.dataset.skipped},
            inputs=describe_files(self.dataset.input_files()) + [{"listing": f"{items.height} items",
                                                                   "sha256": listing_hash}],
            schema={"name": schema.name, "hash": schema.hash, "source": schema.source},
            features=features,  # the schema's attributes, then the dataset's own: what slices and coverage use
            config=_jsonable(dataclasses.asdict(replace(self.config, out=self.run_dir))),
            model_choice={"model": self.model.model, "weights": str(self.model.weights) if self.model.weights else None,
                          "pretrained": self.model.pretrained, "auto": self.config.auto_model, "notice": notice},
            versions=package_versions(),
            started=now_iso(),
        )
        enc = self.config.encode
        encode_fp = fingerprint("encode", listing_hash, dataclasses.asdict(self.model), enc.backend, enc.device,
                                enc.precision, enc.box_margin, enc.max_pixels, enc.output_dtype)
        truth = self.dataset.load_truth()
        has_truth = truth is not None
        annotate_cfg = replace(self.config.annotate, schema=self.schema_name, progress=self.progress)
        annotate_fp = fingerprint("annotate", encode_fp, schema.hash, annotate_cfg.strategy, has_truth)
        errors_fp = fingerprint("errors", dataset_fp)
        eval_fp = fingerprint("eval", annotate_fp, errors_fp, self.dataset.truth_mapping()) if has_truth else None
        slice_settings = {k: v for k, v in dataclasses.asdict(self.config.slices).items() if k != "progress"}
        slices_fp = fingerprint("slices", annotate_fp, errors_fp, slice_settings, features, artifacts.SLICES_FORMAT)
        coverage_fp = fingerprint("coverage", annotate_fp, errors_fp, *_coverage_settings(self.config.coverage),
                                  features)
        summary_fp = fingerprint("summary", slices_fp, eval_fp, coverage_fp)
        report_fp = fingerprint("report", summary_fp)

        bar = progress_bar(len(STAGES), "run", enabled=self.progress, unit="stage")
        try:
            targets = label_targets(schema, annotate_cfg, has_truth)
            # an executor that labels in its encode pass does so only when the annotate stage must run
            in_pass = None if self.manifest.is_done("annotate", annotate_fp) else (targets, annotate_cfg)
            self.stage("encode", encode_fp, lambda: self._encode(items, in_pass), bar)
            self.stage("errors", errors_fp, self._errors, bar)
            self.stage("annotate", annotate_fp, lambda: self._annotate(targets, annotate_cfg), bar)
            if has_truth:
                self.stage("eval", eval_fp, lambda: self._eval(schema, truth), bar)
            else:
                bar.update(1)
            self.stage("slices", slices_fp, lambda: self._slices(features), bar)
            self.stage("coverage", coverage_fp, lambda: self._coverage(features), bar)
            self.stage("summary", summary_fp, self._summary, bar)
            if self.config.report:
                self.stage("report", report_fp, self._report, bar)
            else:
                bar.update(1)
        finally:
            bar.close()
        self.result.seconds = time.perf_counter() - started
        self.manifest.update(finished=now_iso(), ran=self.result.ran, reused=self.result.reused)
        self.result.manifest = self.manifest.data
        return self.result

    def _encode(self, items, in_pass) -> tuple[list[str], dict]:
        from clipengine.executors import ANNOTATES_IN_PASS, InPassAnnotation

        config = replace(self.config.encode, model=self.model, progress=self.progress)
        encode_items = _executor(self.config)
        # ray: each actor loads the model itself; the driver hands on only an encoder it was given
        encoder = self.encoder() if self.config.executor == "local" else self._encoder
        options = {}
        if in_pass is not None and self.config.executor in ANNOTATES_IN_PASS:
            targets, annotate_cfg = in_pass
            options["annotation"] = InPassAnnotation(
                targets=tuple(targets), text_encoder=self._text_encoder_for, config=replace(annotate_cfg, strategy=None))
        done = encode_items(items, self.run_dir, config, encoder=encoder, **options)
        self.delivered = [name for name, _ in in_pass[0]] if options else []
        if done.encoded == 0:
            raise ClipengineError(f"none of the {items.height} items could be decoded; "
                                  f"reasons in {self.run_dir / artifacts.SKIPPED}")
        self.manifest.update(model=done.model_record)
        return list(artifacts.ENCODE_OUTPUTS), {"encoded": done.encoded, "skipped": done.skipped,
                                                "newly_encoded": done.newly_encoded, "reused_rows": done.reused}

    def _errors(self) -> tuple[list[str], dict]:
        errors = self.dataset.load_errors()
        artifacts.write_errors(self.run_dir, errors)
        return [artifacts.ERRORS], {"rows": errors.height, "error_mean": float(errors["error"].mean() or 0.0),
                                    "skipped_inputs": len(self.dataset.skipped)}

    def _text_encoder_for(self, record: dict):
        """A text tower of the model ``record`` names, on this machine (the Ray executor asks for it only
        when the schema's prompt embeddings are not cached yet)."""
        if self._encoder is not None:
            return self._encoder
        from clipengine.encode.encoders import create_encoder

        return create_encoder(replace(self.config.encode, model=self.model, backend="torch", precision="fp32"))

    def _annotate(self, targets, config) -> tuple[list[str], dict]:
        from clipengine.annotate.stage import annotate_run

        schema = targets[0][1]
        names = [name for name, _ in targets]
        if self.delivered == names and all((self.run_dir / name).is_file() for name in names):
            rows = artifacts.parquet_rows(self.run_dir / names[0])
            return names, {"rows": rows, "schema": schema.name, "schema_hash": schema.hash, "in_pass": True}
        rows = annotate_run(self.run_dir, targets, self.text_encoder(), config)
        return names, {"rows": rows, "schema": schema.name, "schema_hash": schema.hash}

    def _eval(self, schema, truth) -> tuple[list[str], dict]:
        from clipengine.annotate.evaluate import evaluate_run

        names = set(schema.attribute_names)
        mapping = {a: spec for a, spec in self.dataset.truth_mapping().items() if a in names}
        report = evaluate_run(self.run_dir, schema, truth, mapping)
        accuracy = {a: round(float(q.accuracy), 4) for (a, s), q in report.results.items()
                    if s == schema.strategy_name and q.accuracy is not None}
        return [artifacts.LABEL_QUALITY_CSV, artifacts.LABEL_QUALITY_MD], {"matched_rows": report.matched_rows,
                                                                          "accuracy": accuracy}

    def _slices(self, features: list[str]) -> tuple[list[str], dict]:
        from clipengine.slices.find import slice_run

        result = slice_run(self.run_dir, replace(self.config.slices, progress=self.progress), features)
        return [artifacts.SLICES_PARQUET, artifacts.SLICES_JSON], {
            "rows": result.n_rows, "error_mean": result.error_mean, "slices": len(result),
            "significant": int(result.significant.sum()) if len(result) else 0,
            "skipped_features": result.skipped_features,
        }

    def _coverage(self, features: list[str]) -> tuple[list[str], dict]:
        from clipengine.coverage.stage import coverage_run

        result = coverage_run(self.run_dir, replace(self.config.coverage, progress=self.progress), features)
        return [artifacts.COVERAGE_JSON, artifacts.COVERAGE_PARQUET], {
            "rows": result.n_rows, "features": list(result.features),
            "coverage": [{k: entry[k] for k in ("t", "covered", "valid")} for entry in result.coverage()],
            "out_of_odd": int(result.out_of_odd), "skipped_features": dict(result.skipped_features),
        }

    def _summary(self) -> tuple[list[str], dict]:
        from clipengine.run.summary import write_summary

        write_summary(self.run_dir, self.manifest.data)
        return [artifacts.SUMMARY], {}

    def _report(self) -> tuple[list[str], dict]:
        from clipengine.report import write_report

        write_report(self.run_dir)
        return [artifacts.REPORT], {}


def _coverage_settings(config) -> tuple[dict, str | None]:
    """What of the coverage settings shapes its outputs: the settings (not ``progress``) and the
    ODD file's content hash (a path alone would miss an edited file)."""
    from clipengine.bindings.files import sha256_file

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    return settings, sha256_file(config.odd) if config.odd is not None else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _executor(config: RunConfig):
    """The encode function of ``config.executor`` with its options bound; for Ray, checks it is installed."""
    from clipengine.executors import create_executor

    encode_items = create_executor(config.executor, address=config.ray_address, num_workers=config.ray_workers,
                                   gpus_per_worker=config.gpus_per_worker, cpus_for_decode=config.cpus_for_decode,
                                   shards=config.ray_shards)
    if config.executor == "ray":
        from clipengine.executors.ray import import_ray

        import_ray()
    return encode_items


def run_job(config: RunConfig, *, encoder=None, hooks: Hooks | None = None, log: RunLog | None = None) -> RunResult:
    """Run (or resume) the whole job of ``config``; returns what ran and what was reused.

    ``encoder``: an already created ``Encoder`` to use instead of creating one from the config
    (its ``model_record`` identifies it); ``hooks``: test seams (:class:`Hooks`).
    """
    _executor(config)  # a wrong executor or option fails before any work starts
    job = _Job(config, encoder=encoder, hooks=hooks, log=log)
    with artifacts.locked(job.run_dir):
        result = job.run()
    job.log.event("run", status="ok", run_dir=str(job.run_dir), ran=result.ran, reused=result.reused,
                  seconds=round(result.seconds, 3))
    return result
