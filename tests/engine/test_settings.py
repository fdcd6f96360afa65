"""EngineSettings: read once from explicit values or SBR_* variables, checked, recorded."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.runtime import Engine
from engine.settings import EngineSettings


def test_environment_then_explicit_values() -> None:
    env = {"SBR_EXEC_WINDOW": "128", "SBR_KERNELS": "reference", "SBR_GLUE_KERNELS": "0",
           "SBR_ATTN": "flash", "SBR_CUDA_GRAPHS": "0", "SBR_CPU_THREADS": "2",
           "SBR_WINDOWS": "sized"}
    s = EngineSettings.from_env(env)
    assert s == EngineSettings(exec_window=128, kernels="reference", glue_kernels=False,
                               attention="flash", cuda_graphs=False, cpu_threads=2,
                               windows="sized")
    assert EngineSettings.from_env(env, exec_window=256).exec_window == 256
    assert EngineSettings.from_env({}) == EngineSettings()
    assert EngineSettings().window("cpu") == 64 and EngineSettings().window("cuda") == 2048


@pytest.mark.parametrize(("env", "msg"), [
    ({"SBR_EXEC_WINDOW": "100"}, "multiple of 64"),
    ({"SBR_EXEC_WINDOW": "big"}, "SBR_EXEC_WINDOW must be an integer"),
    ({"SBR_KERNELS": "fast"}, "kernels must be one of auto, reference"),
    ({"SBR_ATTN": "xformers"}, "attention must be one of cudnn, flash"),
    ({"SBR_WINDOWS": "auto"}, "windows must be one of fixed, sized"),
])
def test_bad_values_are_config_errors(env: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        EngineSettings.from_env(env)


def test_the_engine_records_its_settings() -> None:
    eng = Engine.from_preset("tiny", settings=EngineSettings(exec_window=128))
    d = eng.describe()
    assert d["settings"]["exec_window"] == 128 and d["exec_window"] == 128
    assert d["cache_settings"]["policy"] == "adaptive" and d["chat_template"] == "chatml"


def test_the_engine_runs_with_its_own_kernel_choice() -> None:
    from engine.kernels import ops

    eng = Engine.from_preset("tiny", settings=EngineSettings(kernels="reference",
                                                            glue_kernels=False))
    assert eng.kernels == ops.Kernels(triton=False, glue=False, attention="cudnn")
    seen: list[ops.Kernels] = []
    step = eng.model.logits

    def spy(h):  # noqa: ANN001, ANN202
        seen.append(ops.current())
        return step(h)

    eng.model.logits = spy  # type: ignore[method-assign]
    eng.generate([1, 2, 3])
    assert seen and all(k is eng.kernels for k in seen)
    assert ops.current() == ops.Kernels()  # the default again outside the engine's request
