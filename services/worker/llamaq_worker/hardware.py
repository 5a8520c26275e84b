"""What the machine offers, read without torch: the dtype that `DTYPE=auto` means here."""

from __future__ import annotations

from functools import lru_cache

# CPU flags of native bfloat16 arithmetic: AMX tiles (Sapphire Rapids and later) or AVX-512 BF16 (Cooper Lake,
# Zen 4). Without them torch emulates bf16 and float32 is several times faster on a batch.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def resolve_dtype(dtype: str, device: str, flags: frozenset[str] | None = None) -> str:
    """`dtype` itself, or for "auto": bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cpu"):
        return "bfloat16"
    return "bfloat16" if NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags) else "float32"
