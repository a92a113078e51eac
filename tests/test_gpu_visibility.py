"""The suite hides CUDA from tests not marked gpu, and only from those."""

import os

import pytest


def test_cpu_tests_see_no_gpu():
    from clipengine import envs

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert envs.cuda_hidden()


@pytest.mark.gpu
def test_gpu_tests_see_the_gpus():
    import torch

    assert os.environ.get("CUDA_VISIBLE_DEVICES") != ""
    assert torch.cuda.is_available() and torch.cuda.device_count() >= 1
