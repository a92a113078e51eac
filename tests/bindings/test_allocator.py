import json
import subprocess
import sys

import pytest

# a child process frees and re-allocates an MLP-sized activation (39 MB) and counts its minor page faults
_CHILD = """
import ctypes, json, resource, sys
from clipengine.bindings.allocator import keep_freed_memory_mapped
outcome = keep_freed_memory_mapped() if sys.argv[1] == "tuned" else "default"
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
size = 3200 * 3072 * 4
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activation = libc.malloc(size)  # what torch's CPU allocator does (no huge-page advice, unlike NumPy's)
    ctypes.memset(activation, 1, size)
    libc.free(activation)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"outcome": outcome, "faults": faults[2:]}))
"""


def _faults(mode: str, **env) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=120,
                          env={**_clean_env(), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _clean_env() -> dict:
    import os

    return {key: value for key, value in os.environ.items()
            if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activations_stay_mapped_for_the_next_batch():
    default, tuned = _faults("default"), _faults("tuned")
    if tuned["outcome"].startswith("not applied: the C library"):
        pytest.skip(tuned["outcome"])
    assert tuned["outcome"] == "applied"
    pages = 3200 * 3072 * 4 // 4096
    assert min(default["faults"]) > pages // 2  # glibc's defaults: every allocation faults its pages in again
    assert max(tuned["faults"]) < pages // 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_users_own_malloc_settings_are_left_alone():
    outcome = _faults("tuned", MALLOC_ARENA_MAX="2")["outcome"]
    assert outcome in ("not applied: the user's own settings (MALLOC_ARENA_MAX)",
                       "not applied: the C library is not glibc")
    tunables = _faults("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")["outcome"]
    assert "GLIBC_TUNABLES" in tunables or "not glibc" in tunables


def test_the_torch_cpu_encoder_applies_them_once(tiny_clip):
    from clipengine.bindings import allocator
    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.models import load_model, resolve_model

    encoder = TorchEncoder(load_model(resolve_model(tiny_clip.model_config)), precision="fp32")
    assert encoder.malloc_settings == allocator.keep_freed_memory_mapped()  # the process's one outcome
    assert encoder.malloc_settings == "applied" or encoder.malloc_settings.startswith("not applied")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_environment_form_does_for_another_process_what_the_call_does():
    from clipengine.bindings.allocator import environment

    result = _faults("default", **environment())  # the child never calls keep_freed_memory_mapped
    assert max(result["faults"]) < 3200 * 3072 * 4 // 4096 // 100
