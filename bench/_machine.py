"""The machine a benchmark figure belongs to: CPU model, flags that matter (AMX or not), cores, load, date.

Every table a benchmark prints starts with :func:`machine_line`; its JSON carries :func:`machine_record`.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

# the flags a figure depends on: matrix units, bf16/int8 dot products, 512-bit vectors, popcount
SHOWN_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx512_vpopcntdq", "avx2")


def machine_record() -> dict:
    """CPU model, AMX / AVX512-BF16 / AVX512-VNNI (and whether oneDNN may use AMX), cores this process may use,
    load average, date (UTC)."""
    from clipengine.bindings import amx_in_use, cpu_flags, onednn_isa_limit
    from clipengine.bindings.cpu_probe import cpu_model_name

    flags = cpu_flags()
    cpu = cpu_model_name()
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {
        "cpu": cpu,
        "amx": "amx_bf16" in flags,
        "amx_in_use": amx_in_use(),  # False where ONEDNN_MAX_CPU_ISA keeps oneDNN below AMX
        "onednn_max_cpu_isa": onednn_isa_limit(),
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "flags": [flag for flag in SHOWN_FLAGS if flag in flags],
        "cores": len(os.sched_getaffinity(0)),
        "last_level_cache_mb": last_level_cache_bytes() / 2**20 or None,
        "load_average": load,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


_SIZE_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of the largest cache listed in ``caches`` (sysfs' ``index*/size`` of one CPU: the L3 on x86
    servers, shared by its cores), or 0 where sysfs does not say. Inside a VM this is the host CPU's cache,
    of which a guest's fair share may be smaller."""
    largest = 0
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text().strip()  # "491520K"
            scale = _SIZE_UNITS.get(text[-1:], 1)
            size = int(text[:-1] if text[-1:] in _SIZE_UNITS else text) * scale
        except (OSError, ValueError):
            continue
        largest = max(largest, size)
    return largest


def machine_line(record: dict | None = None) -> str:
    """One line: ``<CPU>, AMX|no AMX (AVX512-BF16: yes|no; flags …), N cores, load L, <date>``."""
    record = record or machine_record()
    amx = "AMX" if record["amx"] else "no AMX"
    if record["amx"] and not record.get("amx_in_use", True):
        amx += f" not used (ONEDNN_MAX_CPU_ISA={record.get('onednn_max_cpu_isa')})"
    bf16 = "yes" if record["avx512_bf16"] else "no"
    flags = " ".join(record.get("flags", [])) or "none of " + "/".join(SHOWN_FLAGS)
    load = "" if record.get("load_average") is None else f", load average {record['load_average']}"
    return f"{record['cpu']}, {amx} (AVX512-BF16: {bf16}; flags {flags}), {record['cores']} cores{load}, {record['date']}"
