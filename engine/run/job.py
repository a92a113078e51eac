"""The whole semantic test as one resumable job: a dataset through encode → errors → annotate →
eval → slices → coverage → summary → report, each stage recorded in ``RUN/manifest.json``.

This module only sequences stages (each usable alone, each in its own package) and records them:

| stage | runs | writes (:mod:`clipengine.artifacts`) | its fingerprint covers |
| --- | --- | --- | --- |
| encode | an executor's ``encode_items`` | the encode outputs | item listing (paths, boxes, file sizes and mtimes), model, encode settings |
| errors | the dataset adapter | errors.parquet | the adapter's input files (content), settings and listing |
| annotate | :func:`clipengine.annotate.stage.annotate_run` | metadata.parquet (+ metadata_naive.parquet with ground truth) | encode, schema hash, strategy, labels file (content) and --adapt |
| eval | :func:`clipengine.annotate.evaluate.evaluate_run` | label_quality.csv / .md (ground truth, a labels file or both) | annotate, errors, labels file |
| slices | :func:`clipengine.slices.find.slice_run` | slices.parquet, slices.json | annotate, errors, slice settings, features, the labels file's content |
| coverage | :func:`clipengine.coverage.stage.coverage_run` | coverage.json, coverage.parquet | annotate, errors, coverage settings, the ODD file (content), features |
| compare (with ``--baseline``) | :func:`clipengine.compare.stage.compare_runs` | compare.json, compare_items.parquet | slices, the baseline's compared files (content), compare settings |
| summary | :func:`clipengine.run.summary.write_summary` | summary.md | slices, eval, coverage, compare |
| report | :func:`clipengine.report.write_report` | report.html (+ thumbs/) | summary, compare |

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
COMPARE_STAGE = "compare"  # runs after coverage when the job has a baseline run


@dataclass
class RunResult:
    """What one ``run_job`` did: ``ran`` the stages that worked now, ``reused`` those already done."""

    run_dir: Path
    manifest: dict
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    seconds: float = 0.0
    read_only: bool = False  # the run directory could not be written: it was only checked


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
        if self.result.read_only and not self.manifest.is_done(name, stage_fingerprint):
            raise ClipengineError(f"{self.run_dir} is read-only and its {name} stage would have to run (never "
                                  "finished there, or its inputs changed); give a writable --out")
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
    def run(self, *, read_only: bool = False) -> RunResult:
        """Run the stages that are not finished; ``read_only``: write nothing, only check that every
        stage is finished for these inputs (a one-line error names the first that is not)."""
        from clipengine.annotate.schemas import load_schema
        from clipengine.annotate.stage import label_targets
        from clipengine.datasets.base import describe_files, hash_listing
        from clipengine.encode.encoders import choose_model
        from clipengine.progress import progress_bar

        started = time.perf_counter()
        baseline_digest = self._check_baseline()
        schema_file = Path(self.schema_name)
        labels_file = self.config.annotate.labels
        odd_file = self.config.coverage.odd
        inputs = self.dataset.input_files()
        given = [*inputs, *([schema_file] if schema_file.is_file() else []),
                 *([labels_file] if labels_file is not None else []), *([odd_file] if odd_file is not None else [])]
        artifacts.check_inputs_kept(self.run_dir, given)
        self.result.read_only = read_only
        self.manifest = Manifest(self.run_dir, read_only=read_only)
        items = self.dataset.list_items()
        listing_hash = hash_listing(items)
        dataset_fp = self.dataset.fingerprint(items)
        self.model, notice = choose_model(self.config, self.manifest.data.get("model_choice"))
        if notice:
            self.result.notices.append(notice)
            self.log.say(notice)
            self.log.event("notice", message=notice)
        schema = load_schema(self.schema_name)
        labels_record = _check_labels(labels_file, items, schema)  # a bad labels file fails before any work
        if self.config.coverage.odd is not None:  # a bad ODD file stops the run before any work
            from clipengine.coverage.odd import load_odd

            load_odd(self.config.coverage.odd)
        features = artifacts.joined_features(schema.attribute_names, self.dataset.error_features(),
                                             source=str(inputs[0]) if inputs else f"dataset {self.config.dataset}")
        self.manifest.update(
            dataset={"name": self.config.dataset, "root": str(self.dataset.root) if self.dataset.root else None,
                     "settings": self.dataset.settings(), "items": items.height,
                     "skipped_inputs": self.dataset.skipped},
            inputs=describe_files(inputs) + [{"listing": f"{items.height} items",
                                                                   "sha256": listing_hash}],
            schema={"name": schema.name, "hash": schema.hash, "source": schema.source},
            features=features,  # the schema's attributes, then the dataset's own: what slices and coverage use
            config=_jsonable(dataclasses.asdict(replace(self.config, out=self.run_dir))),
            model_choice={"model": self.model.model, "weights": str(self.model.weights) if self.model.weights else None,
                          "pretrained": self.model.pretrained, "auto": self.config.auto_model, "notice": notice},
            versions=package_versions(),
            started=now_iso(),
            labels=labels_record,
        )
        enc = self.config.encode
        encode_fp = fingerprint("encode", listing_hash, dataclasses.asdict(self.model), enc.backend, enc.device,
                                enc.precision, enc.box_margin, enc.max_pixels, enc.output_dtype)
        truth = self.dataset.load_truth()
        has_truth = truth is not None
        annotate_cfg = replace(self.config.annotate, schema=self.schema_name, progress=self.progress)
        labels_fp = (labels_record["sha256"], annotate_cfg.adapt) if labels_record else None
        annotate_fp = fingerprint("annotate", encode_fp, schema.hash, annotate_cfg.strategy, has_truth,
                                  *([labels_fp] if labels_fp else []))
        errors_fp = fingerprint("errors", dataset_fp)
        evaluates = has_truth or labels_record is not None
        eval_fp = fingerprint("eval", annotate_fp, errors_fp, self.dataset.truth_mapping() if has_truth else None,
                              labels_fp) if evaluates else None
        slice_settings = {k: v for k, v in dataclasses.asdict(self.config.slices).items() if k != "progress"}
        slices_fp = fingerprint("slices", annotate_fp, errors_fp, slice_settings, features, artifacts.SLICES_FORMAT,
                                labels_record["sha256"] if labels_record else None)
        compare_fp = None
        if self.config.baseline is not None:
            compare_fp = fingerprint("compare", slices_fp, str(Path(self.config.baseline).resolve()), baseline_digest,
                                     dataclasses.asdict(self.config.compare))
        coverage_fp = fingerprint("coverage", annotate_fp, errors_fp, *_coverage_settings(self.config.coverage),
                                  features)
        summary_fp = fingerprint("summary", slices_fp, eval_fp, coverage_fp, *([compare_fp] if compare_fp else []))
        report_fp = fingerprint("report", summary_fp, *([compare_fp] if compare_fp else []))

        bar = progress_bar(len(STAGES) + (compare_fp is not None), "run", enabled=self.progress, unit="stage")
        try:
            targets = label_targets(schema, annotate_cfg, has_truth)
            # an executor that labels in its encode pass does so only when the annotate stage must run
            # (and not with labels: adaptation needs every embedding first)
            in_pass = None if self.manifest.is_done("annotate", annotate_fp) or labels_record else (targets, annotate_cfg)
            self.stage("encode", encode_fp, lambda: self._encode(items, in_pass), bar)
            self.stage("errors", errors_fp, self._errors, bar)
            self.stage("annotate", annotate_fp, lambda: self._annotate(targets, annotate_cfg), bar)
            if evaluates:
                self.stage("eval", eval_fp, lambda: self._eval(schema, truth), bar)
            else:
                bar.update(1)
            self.stage("slices", slices_fp, lambda: self._slices(features), bar)
            self.stage("coverage", coverage_fp, lambda: self._coverage(features), bar)
            if compare_fp is not None:
                self.stage(COMPARE_STAGE, compare_fp, self._compare, bar)
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
        info = {"rows": rows, "schema": schema.name, "schema_hash": schema.hash}
        if config.labels is not None:
            adaptation, _, _ = artifacts.read_adaptation(self.run_dir / names[0])
            info.update(adapt=config.adapt, adaptation=adaptation)
        return names, info

    def _eval(self, schema, truth) -> tuple[list[str], dict]:
        from clipengine.annotate.evaluate import evaluate_run

        names = set(schema.attribute_names)
        mapping = {a: spec for a, spec in self.dataset.truth_mapping().items() if a in names}
        report, reliability = evaluate_run(self.run_dir, schema, truth, mapping, labels=self.config.annotate.labels)
        info: dict = {}
        if report is not None:
            info.update(matched_rows=report.matched_rows,
                        accuracy={a: round(float(q.accuracy), 4) for (a, s), q in report.results.items()
                                  if s != "naive" and q.accuracy is not None})
        if reliability is not None:
            info["reliability"] = {item.attribute: {"served": item.served, "labels": item.n,
                                                    "reliable": item.judgement()[0],
                                                    "accuracy": round(item.accuracy(item.served_labeller)[0], 4)}
                                   for item in reliability.attributes}
        return [artifacts.LABEL_QUALITY_CSV, artifacts.LABEL_QUALITY_MD], info

    def _slices(self, features: list[str]) -> tuple[list[str], dict]:
        from clipengine.slices.find import slice_run

        result = slice_run(self.run_dir, replace(self.config.slices, progress=self.progress), features,
                           labels=self.config.annotate.labels)
        info = {"rows": result.n_rows, "error_mean": result.error_mean, "slices": len(result),
                "significant": int(result.significant.sum()) if len(result) else 0,
                "skipped_features": result.skipped_features, "family": result.family.get("design")}
        if result.labels is not None:
            info["not_confirmed"] = sum(c is False for c in result.confirmed)
        return [artifacts.SLICES_PARQUET, artifacts.SLICES_JSON], info

    def _check_baseline(self) -> str | None:
        """The content digest of the baseline's compared files; a one-line error (before any work)
        when the baseline is this run's own folder or not a finished run."""
        if self.config.baseline is None:
            return None
        baseline = Path(self.config.baseline)
        if baseline.resolve() == self.run_dir.resolve():
            raise ClipengineError(f"--baseline {baseline} is this run's own directory; give an earlier run")
        digest = artifacts.comparison_digest(baseline)
        if digest is None:
            missing = [name for name in artifacts.COMPARED_INPUTS if not (baseline / name).is_file()]
            raise ClipengineError(f"--baseline {baseline}: not a finished run (no {', '.join(missing)})")
        return digest

    def _compare(self) -> tuple[list[str], dict]:
        from clipengine.compare.stage import compare_runs, write_comparison

        comparison = compare_runs(self.config.baseline, self.run_dir, self.config.compare)
        write_comparison(self.run_dir, comparison)
        return [artifacts.COMPARE_JSON, artifacts.COMPARE_ITEMS], {
            "baseline": str(self.config.baseline), **comparison.facts["findings"],
            "mismatches": len(comparison.mismatches)}

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


def _check_labels(path: Path | None, items, schema) -> dict | None:
    """The labels file's record (file, sha256, rows) after reading it against the dataset's listing
    and the schema: a bad file is one line before anything runs (the annotate stage reads it again
    against the items that were encoded)."""
    if path is None:
        return None
    from clipengine.annotate.labels import read_labels
    from clipengine.bindings.files import sha256_file

    label_set = read_labels(path, artifacts.key_columns(items), {a.name: a.class_names for a in schema.attributes})
    return {"file": str(path), "sha256": sha256_file(path), "rows": int(len(label_set.rows)),
            "attributes": label_set.attributes}


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
    if job.run_dir.is_dir() and not artifacts.writable(job.run_dir):
        result = job.run(read_only=True)  # a finished run on read-only storage can still be checked
    else:
        with artifacts.locked(job.run_dir):
            result = job.run()
    job.log.event("run", status="ok", run_dir=str(job.run_dir), ran=result.ran, reused=result.reused,
                  seconds=round(result.seconds, 3))
    return result
