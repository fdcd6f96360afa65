"""How an engine executes (not what it caches): windows, kernels, graphs, threads.

Read once, at engine construction, from explicit values or the ``SBR_*`` environment variables
(`EngineSettings.from_env`), and recorded in the result JSON's ``engine`` block, so a run says
how it was computed and no code reads the environment later.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError

CHUNK = 64  # engine.config.CHUNK: windows are multiples of the GDN chunk
KERNELS = ("auto", "reference")
ATTENTION = ("cudnn", "flash")
WINDOWS = ("fixed", "sized")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Execution settings of one engine.

    exec_window: rows of every prefill window (None: 64 on CPU, 2048 on CUDA); a multiple of 64.
    kernels: "auto" (Triton on CUDA, the torch reference elsewhere) or "reference" everywhere
    (to A/B the two on a GPU). glue_kernels: the Triton RMSNorm/SwiGLU/conv glue on CUDA.
    attention: prefill attention on CUDA, "cudnn" key pieces or one "flash" call.
    windows: "fixed" (every window exec_window rows: the fastest kernels, exact because every
    call has the same shape) or "sized" (a window ends at the 64-row boundary after its last
    valid row; the projections run the batch-invariant linear and, on CUDA, attention the
    window-invariant kernel inside windows, so a position's bits do not depend on the window's
    size: short warm turns stop paying for a whole window). The two modes give different bits;
    each is exact within itself. cuda_graphs: decode through captured CUDA graphs. cpu_threads:
    torch threads for models of hidden size <= 256 on CPU (tiny matmuls gain nothing from
    threads, and on a busy machine the thread synchronisation costs up to 20x); None leaves
    torch's setting alone.
    """

    exec_window: int | None = None
    kernels: str = "auto"
    glue_kernels: bool = True
    attention: str = "cudnn"
    cuda_graphs: bool = True
    cpu_threads: int | None = 1
    windows: str = "fixed"

    def __post_init__(self) -> None:
        w = self.exec_window
        if w is not None and (w <= 0 or w % CHUNK):
            raise ConfigError(f"exec window must be a positive multiple of {CHUNK}, got {w}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, got "
                              f"{self.kernels!r}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION)}, got "
                              f"{self.attention!r}")
        if self.windows not in WINDOWS:
            raise ConfigError(f"windows must be one of {', '.join(WINDOWS)}, got "
                              f"{self.windows!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu threads must be >= 1, got {self.cpu_threads}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **given: Any) -> EngineSettings:
        """Settings from ``given``, else the ``SBR_*`` variables, else the defaults:
        SBR_EXEC_WINDOW, SBR_KERNELS, SBR_GLUE_KERNELS (0/1), SBR_ATTN, SBR_CUDA_GRAPHS (0/1),
        SBR_CPU_THREADS, SBR_WINDOWS (fixed/sized)."""
        e = os.environ if env is None else env
        read: dict[str, Any] = {}
        if "SBR_EXEC_WINDOW" in e:
            read["exec_window"] = _int(e, "SBR_EXEC_WINDOW")
        if "SBR_KERNELS" in e:
            read["kernels"] = e["SBR_KERNELS"]
        if "SBR_GLUE_KERNELS" in e:
            read["glue_kernels"] = e["SBR_GLUE_KERNELS"] != "0"
        if "SBR_ATTN" in e:
            read["attention"] = e["SBR_ATTN"]
        if "SBR_CUDA_GRAPHS" in e:
            read["cuda_graphs"] = e["SBR_CUDA_GRAPHS"] != "0"
        if "SBR_CPU_THREADS" in e:
            read["cpu_threads"] = _int(e, "SBR_CPU_THREADS")
        if "SBR_WINDOWS" in e:
            read["windows"] = e["SBR_WINDOWS"]
        read.update({k: v for k, v in given.items() if v is not None})
        return cls(**read)

    def window(self, device_type: str) -> int:
        """The prefill window for a device: exec_window, or 64 on CPU and 2048 on CUDA."""
        if self.exec_window is not None:
            return self.exec_window
        return 2048 if device_type == "cuda" else 64

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {env[name]!r}") from None
