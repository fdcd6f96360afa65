"""Scenario registry and loading of scenario definitions (TOML + `--set` overrides)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.errors import ConfigError, UserError
from sbrbench.scenarios.base import (
    ENGINE_PARAMS,
    Param,
    Scenario,
    ScenarioConfig,
    Step,
    check_table,
    check_value,
    load_toml,
    parse_set_value,
    scenario_dirs,
)
from sbrbench.scenarios.deep_resume import DeepResume
from sbrbench.scenarios.parity import Parity
from sbrbench.scenarios.round_robin import RoundRobin
from sbrbench.scenarios.runner import Arrivals, RunOutcome, run_scenario
from sbrbench.scenarios.trace import Trace

SCENARIOS: dict[str, type[Scenario]] = {
    cls.name: cls for cls in (DeepResume, RoundRobin, Parity, Trace)
}

__all__ = [
    "SCENARIOS",
    "Arrivals",
    "ScenarioConfig",
    "Scenario",
    "Step",
    "RunOutcome",
    "get_scenario",
    "load_config",
    "make_scenario",
    "run_scenario",
    "shipped_file",
    "apply_sets",
]


def get_scenario(name: str) -> type[Scenario]:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise UserError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})") from None


def shipped_file(name: str) -> Path:
    """The TOML shipped for scenario `name` (checkout `scenarios/` or the wheel's copy)."""
    for d in scenario_dirs():
        p = d / f"{name}.toml"
        if p.is_file():
            return p
    raise ConfigError(
        f"no scenario file {name}.toml in " + " or ".join(str(d) for d in scenario_dirs())
    )


def parse_config(doc: dict, name: str, where: str) -> ScenarioConfig:
    """Check a parsed scenario TOML against the scenario's declared parameters."""
    cls = get_scenario(name)
    top = {"scenario", "description", "params", "engine"}
    unknown = sorted(set(doc) - top)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(top))})")
    if doc.get("scenario") != name:
        raise ConfigError(f"{where}: 'scenario' must be {name!r}, got {doc.get('scenario')!r}")
    desc = doc.get("description", "")
    if not isinstance(desc, str):
        raise ConfigError(f"{where}: 'description' must be a string")
    for table in ("params", "engine"):
        if table not in doc:
            raise ConfigError(f"{where}: missing table [{table}]")
    params = check_table(doc["params"], cls.PARAMS, f"{where} [params]")
    engine = check_table(doc["engine"], ENGINE_PARAMS, f"{where} [engine]", required=False)
    cls.check_params(params, f"{where} [params]")
    return ScenarioConfig(name, desc, params, engine, where)


def apply_sets(cfg: ScenarioConfig, sets: Sequence[str]) -> ScenarioConfig:
    """`--set KEY=VALUE` (params) and `--set engine.KEY=VALUE` overrides, checked and typed."""
    cls = get_scenario(cfg.name)
    params, engine = dict(cfg.params), dict(cfg.engine)
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        table, schema, short = params, cls.PARAMS, key
        if key.startswith("engine."):
            table, schema, short = engine, ENGINE_PARAMS, key.removeprefix("engine.")
        spec: Param | None = schema.get(short)
        if spec is None:
            known = ", ".join([*cls.PARAMS, *(f"engine.{k}" for k in ENGINE_PARAMS)])
            raise UserError(f"--set {key}: unknown key for {cfg.name} (known: {known})")
        value = parse_set_value(key, text, spec)
        try:
            table[short] = check_value(short, value, spec, "--set")
        except ConfigError as e:
            raise UserError(str(e)) from None
    try:
        cls.check_params(params, "--set")
    except ConfigError as e:
        raise UserError(str(e)) from None
    return cfg._replace(params=params, engine=engine)


def load_config(name: str, file: Path | None = None, sets: Sequence[str] = ()) -> ScenarioConfig:
    """The scenario's definition: `file` or the shipped TOML, checked, with overrides applied."""
    get_scenario(name)
    path = Path(file) if file else shipped_file(name)
    cfg = parse_config(load_toml(path), name, str(path))
    return apply_sets(cfg, sets)


def make_scenario(cfg: ScenarioConfig, seed: int) -> Scenario:
    return get_scenario(cfg.name)(cfg.params, seed)
