"""Decode + resize throughput: clipengine's ``iter_batches`` against open_clip's own preprocess.

The peer is what an open_clip user writes: ``preprocess(Image.open(path))`` for every file in a
plain loop (PIL decode, torchvision resize/crop, ToTensor, Normalize), stacked into batches; and the
same preprocess behind a torch ``DataLoader`` with worker processes. clipengine yields uint8 batches
(normalization happens on the device). Both run in this process on the same JPEG files; every
figure is the best of ``--repeat`` interleaved passes, and ratios are taken within the run.

    flock /tmp/clipengine-bench.lock python bench/images.py                # 200 generated JPEGs
    flock /tmp/clipengine-bench.lock python bench/images.py --input DIR    # your own files
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def make_jpegs(folder: Path, count: int, min_side: int, max_side: int, seed: int = 0) -> list[str]:
    """``count`` JPEGs (quality 90) made from scikit-image's sample photos, long side in [min_side, max_side]."""
    import skimage.data as skdata
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = [
        Image.fromarray(getattr(skdata, name)()).convert("RGB")
        for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry")
    ]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        long_side = int(rng.integers(min_side, max_side + 1))
        short_side = int(long_side * rng.uniform(0.6, 0.85))
        size = (long_side, short_side) if i % 3 else (short_side, long_side)
        path = folder / f"{i:05d}.jpg"
        sources[i % len(sources)].resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return paths


def time_best(run, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def open_clip_loop(files: list[str], image_size: int, batch_size: int) -> int:
    import torch
    from open_clip.transform import image_transform
    from PIL import Image

    preprocess = image_transform(image_size, is_train=False)
    count = 0
    for start in range(0, len(files), batch_size):
        batch = torch.stack([preprocess(Image.open(f)) for f in files[start : start + batch_size]])
        count += batch.shape[0]
    return count


class _Files:
    def __init__(self, files, preprocess):
        self.files, self.preprocess = files, preprocess

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        return self.preprocess(Image.open(self.files[i]))


def open_clip_dataloader(files: list[str], image_size: int, batch_size: int, workers: int) -> int:
    import torch
    from open_clip.transform import image_transform

    loader = torch.utils.data.DataLoader(
        _Files(files, image_transform(image_size, is_train=False)), batch_size=batch_size, num_workers=workers
    )
    return sum(batch.shape[0] for batch in loader)


def clipengine_batches(files, image_size, batch_size, workers, *, exact=False, device=None) -> int:
    """clipengine's CPU pipeline, or with ``device`` its device decoder (torchvision ``decode_jpeg`` there)."""
    from clipengine.encode.geometry import ImageSpec
    from clipengine.encode.gpu_decode import iter_batches_torch
    from clipengine.encode.pipeline import iter_batches

    spec = ImageSpec(image_size, fast_jpeg=not exact, fast_resize=not exact)
    if device is not None:
        batches = iter_batches_torch(files, None, spec, device=device, batch_size=batch_size, workers=workers,
                                     to_numpy=False)
    else:
        batches = iter_batches(files, None, spec, batch_size=batch_size, workers=workers)
    return sum(len(b.indices) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, help="folder or list of JPEGs (default: generate --count files)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--min-side", type=int, default=500, help="long side of generated files, lower bound")
    parser.add_argument("--max-side", type=int, default=1600, help="long side of generated files, upper bound")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # decode benchmark: keep torch's intra-op threads out of the way
    with tempfile.TemporaryDirectory(prefix="clipengine-bench-images-") as scratch:
        if args.input:
            from clipengine.encode.inputs import list_image_files

            files = list_image_files(args.input)
        else:
            files = make_jpegs(Path(scratch), args.count, args.min_side, args.max_side)
        n, s, b, r = len(files), args.image_size, args.batch_size, args.repeat
        # warm the page cache and the imports once, untimed
        open_clip_loop(files[: min(n, 8)], s, b)
        clipengine_batches(files[: min(n, 8)], s, b, 1)
        for f in files:
            Path(f).read_bytes()

        cases = [
            ("open_clip preprocess, plain loop", lambda: open_clip_loop(files, s, b)),
            ("open_clip preprocess, DataLoader 2 workers", lambda: open_clip_dataloader(files, s, b, 2)),
            ("clipengine exact, 1 thread", lambda: clipengine_batches(files, s, b, 1, exact=True)),
            ("clipengine exact, 2 threads", lambda: clipengine_batches(files, s, b, 2, exact=True)),
            ("clipengine default, 1 thread", lambda: clipengine_batches(files, s, b, 1)),
            ("clipengine default, 2 threads", lambda: clipengine_batches(files, s, b, 2)),
            ("clipengine --decode device on the CPU, 2 threads", lambda: clipengine_batches(files, s, b, 2, device="cpu")),
        ]
        if torch.cuda.is_available():
            cases.append(("clipengine --decode device on cuda (nvJPEG)",
                          lambda: clipengine_batches(files, s, b, 2, device="cuda")))
        # interleaved passes (case A, B, …, A, B, …), best per case: a shared machine's load drifts
        best = {name: float("inf") for name, _ in cases}
        for _ in range(r):
            for name, run in cases:
                best[name] = min(best[name], time_best(run, 1))
        results = []
        baseline = n / best[cases[0][0]]
        from clipengine.bench._machine import machine_line

        print(f"# {machine_line()}")
        print(f"{n} JPEG files, S={s}, batch {b}, best of {r} interleaved passes")
        print(f"{'case':46s} {'img/s':>8s} {'× loop':>7s}")
        for name, _ in cases:
            rate = n / best[name]
            results.append({"case": name, "images_per_s": round(rate, 1), "ratio_to_open_clip_loop": round(rate / baseline, 2)})
            print(f"{name:46s} {rate:8.1f} {rate / baseline:7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"files": n, "image_size": s, "batch_size": b, "results": results}, indent=2))


if __name__ == "__main__":
    from clipengine.interrupts import stop_on_sigterm

    stop_on_sigterm()  # stopped by a scheduler, the script removes its scratch folders as on Ctrl-C
    main()
