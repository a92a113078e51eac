"""A CPU forward split into independent streams: the plan, the threads, the order of the rows, and the
fused forward's rows with and without streams."""

import threading

import numpy as np
import pytest
import torch

from clipengine.bindings.cpu_streams import CpuStreams, in_stream, stream_plan
from clipengine.bindings.torch_vit_cpu import int8_linear_available


@pytest.mark.parametrize(("images", "threads", "plan"), [
    (64, 2, [(32, 1), (32, 1)]),
    (65, 2, [(33, 1), (32, 1)]),
    (16, 2, [(8, 1), (8, 1)]),
    (15, 2, [(15, 2)]),  # two streams would get under 8 images each
    (64, 16, [(8, 2)] * 8),
    (40, 16, [(8, 4), (8, 3), (8, 3), (8, 3), (8, 3)]),
    (64, 1, [(64, 1)]),
    (0, 2, [(0, 2)]),
])
def test_plan_spreads_rows_and_threads_evenly_with_enough_images_per_stream(images, threads, plan):
    assert stream_plan(images, threads) == plan


def _recording_forward(calls: list):
    def forward(part: torch.Tensor) -> torch.Tensor:
        calls.append((threading.get_ident(), torch.get_num_threads(), in_stream(), len(part)))
        return part * 2
    return forward


def test_streams_run_the_parts_in_threads_of_their_own_and_keep_the_rows_in_order():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calls: list = []
        batch = torch.arange(40, dtype=torch.float32).reshape(20, 2)
        streams = CpuStreams(2)
        out = streams.run(_recording_forward(calls), batch)
        torch.testing.assert_close(out, batch * 2)
        assert sorted(call[3] for call in calls) == [10, 10]
        assert len({call[0] for call in calls}) == 2  # each in its own thread, the first in the caller's
        assert [call[3] for call in calls if call[0] == threading.get_ident()] == [10]
        assert all(call[1] == 1 and call[2] for call in calls)  # one torch thread each, marked as a stream
        assert torch.get_num_threads() == 2 and not in_stream()
        started_later: list = []  # a thread started after the streams gets the caller's count, not a stream's
        thread = threading.Thread(target=lambda: started_later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert started_later == [2]
        streams.close()
    finally:
        torch.set_num_threads(previous)


def test_a_batch_too_small_to_split_runs_in_the_calling_thread():
    calls: list = []
    out = CpuStreams(2).run(_recording_forward(calls), torch.ones(7, 3))
    assert out.shape == (7, 3) and calls == [(threading.get_ident(), torch.get_num_threads(), False, 7)]


def test_a_failing_stream_raises_in_the_caller():
    def forward(part):
        if part[0, 0] > 0:
            raise RuntimeError("stream failed")
        return part

    batch = torch.cat([torch.zeros(8, 1), torch.ones(8, 1)])
    with pytest.raises(RuntimeError, match="stream failed"):
        CpuStreams(2).run(forward, batch)


def _cosine(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture
def tiny_towers(tiny_clip):
    from clipengine.encode.models import load_model, resolve_model

    return load_model(resolve_model(tiny_clip.model_config))


def test_torch_encoder_splits_batches_into_streams_with_the_same_rows(tiny_towers):
    from clipengine.bindings.torch import TorchEncoder

    pixels = np.random.default_rng(0).integers(0, 256, (19, 32, 32, 3), dtype=np.uint8)
    split = TorchEncoder(tiny_towers, precision="fp32", num_threads=2)
    whole = TorchEncoder(tiny_towers, precision="fp32", num_threads=2, streams=False)
    assert split.cpu_streams == 2 and whole.cpu_streams == 1
    assert split._streams.plan(len(pixels)) == [(10, 1), (9, 1)]
    np.testing.assert_allclose(split.encode_images(pixels), whole.encode_images(pixels), atol=2e-6)
    assert TorchEncoder(tiny_towers, precision="fp32", num_threads=1).cpu_streams == 1
    assert TorchEncoder(tiny_towers, precision="fp32", num_threads=2, fused=False).cpu_streams == 1


@pytest.mark.skipif(not int8_linear_available(), reason="this torch build has no oneDNN int8 linear")
def test_int8_streams_quantize_on_their_own_thread(tiny_towers, monkeypatch):
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.kernels import activation_quant

    quantize = activation_quant.quantize_uint8
    parallel_calls: list = []

    def recording(*args, parallel=True, **kwargs):
        parallel_calls.append(parallel)
        return quantize(*args, parallel=parallel, **kwargs)

    monkeypatch.setattr(activation_quant, "quantize_uint8", recording)
    pixels = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    split = TorchEncoder(tiny_towers, precision="int8", num_threads=2)
    whole = TorchEncoder(tiny_towers, precision="int8", num_threads=2, streams=False)
    parallel_calls.clear()
    rows = split.encode_images(pixels)
    assert parallel_calls and not any(parallel_calls)
    parallel_calls.clear()
    reference = whole.encode_images(pixels)
    assert parallel_calls and all(parallel_calls)
    assert _cosine(rows, reference).min() >= 0.999  # each stream quantizes its own rows' range
