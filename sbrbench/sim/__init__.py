"""Policy simulation: the engine's own cache path on request streams, with a cost model in place
of the model and offline references beside the online policies.

streams.py: Mooncake traces and recorded scenarios as `SimRequest` streams; oracle.py: the
stream's future for the offline references; simulator.py: the simulator, policy runs and their
summaries; optimum.py: the yardstick (exact optimum, LP bound, floor); workload.py: what a run
simulates, rebuilt from plain data in any process; cells.py: a sweep's cells and the backends
that run them; target.py: `--target sim` for scenarios.
"""

from sbrbench.sim.cells import (
    BACKENDS,
    FAMILY_SEP,
    OPTIMUM_MODES,
    Cell,
    assemble,
    digest,
    families,
    family_summary,
    run_cell,
    run_cells,
    yardstick_cells,
)
from sbrbench.sim.oracle import FutureIndex
from sbrbench.sim.simulator import (
    EXTRA_ORACLES,
    ORACLES,
    REFERENCES,
    SIM_SCHEMA,
    SWEEP_SCHEMA,
    PolicyRun,
    PolicyVariant,
    SimCache,
    SimRow,
    Simulator,
    rows_json,
    run_policy,
    summarize,
    variants,
    versus_belady,
    with_belady,
)
from sbrbench.sim.streams import ListStream, SimRequest, Stream, TraceStream, load_trace
from sbrbench.sim.target import SimTarget, model_config, record_scenario, reply_tokens
from sbrbench.sim.workload import Source, Workload, workload

__all__ = [
    "BACKENDS",
    "OPTIMUM_MODES",
    "Cell",
    "Source",
    "Workload",
    "FAMILY_SEP",
    "assemble",
    "digest",
    "families",
    "family_summary",
    "run_cell",
    "run_cells",
    "workload",
    "yardstick_cells",
    "EXTRA_ORACLES",
    "ORACLES",
    "REFERENCES",
    "SIM_SCHEMA",
    "SWEEP_SCHEMA",
    "FutureIndex",
    "ListStream",
    "PolicyRun",
    "PolicyVariant",
    "SimCache",
    "SimRequest",
    "SimRow",
    "SimTarget",
    "Simulator",
    "Stream",
    "TraceStream",
    "load_trace",
    "model_config",
    "record_scenario",
    "reply_tokens",
    "rows_json",
    "run_policy",
    "summarize",
    "variants",
    "versus_belady",
    "with_belady",
]
