"""A GPU named by index (``--device cuda:0``) through every command that takes ``--device``: encode, annotate,
search give what the CPU gives, and the process's current CUDA device is left as it was. GPU only."""

import json
import shutil

import numpy as np
import polars as pl
import pytest

pytestmark = pytest.mark.gpu


def _main(args):
    from clipengine.cli import main

    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 0, args


def test_encode_annotate_search_on_cuda_0_match_the_cpu(tiny_clip, sample_photos, tmp_path, capsys):
    import torch

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sample_photos:
        shutil.copy(path, photos / path.name)
    current = torch.cuda.current_device()
    model = ["--model", str(tiny_clip.config_path), "--weights", str(tiny_clip.weights_path)]
    for device in ("cpu", "cuda:0"):
        _main(["encode", str(photos), "--out", str(tmp_path / device.replace(":", "-")), *model, "--backend", "torch",
               "--precision", "fp32", "--device", device, "--quiet"])
    cpu, gpu = tmp_path / "cpu", tmp_path / "cuda-0"
    record = json.loads((gpu / "model.json").read_text())
    assert record["device"] == "cuda:0" and record["decode"].startswith("device: JPEGs decoded by torchvision (nvJPEG)")
    rows_cpu, rows_gpu = np.load(cpu / "embeddings.npy"), np.load(gpu / "embeddings.npy")
    assert np.min(np.sum(rows_cpu * rows_gpu, axis=1)) > 0.99  # nvJPEG and the device resize are not bit-exact

    # annotate and search the same rows on the CPU and on cuda:0: the same labels, the same rows in order
    results = {}
    for device in ("cpu", "cuda:0"):
        labelled = tmp_path / f"metadata-{device.replace(':', '-')}.parquet"
        _main(["annotate", str(gpu), "--out", str(labelled), "--device", device, "--quiet"])
        capsys.readouterr()
        _main(["search", str(gpu), "an astronaut", "a cup of coffee", "-k", "3", "--json", "--device", device,
               "--index", "none"])
        results[device] = (pl.read_parquet(labelled), json.loads(capsys.readouterr().out))
    (labels_cpu, found_cpu), (labels_gpu, found_gpu) = results["cpu"], results["cuda:0"]
    label_columns = [c for c in labels_cpu.columns if not c.endswith(("_prob", "_margin")) and c != "path"]
    assert labels_cpu.select(label_columns).equals(labels_gpu.select(label_columns))
    assert [r["row"] for r in found_gpu] == [r["row"] for r in found_cpu]
    assert torch.cuda.current_device() == current
