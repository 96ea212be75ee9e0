"""Which missions have an implementation, and with which phases.

Kept free of heavy imports: the DAG files and `bem-fleet validate` read it at parse time.
A mission may be `enabled: true` in config only if it is listed here, and its experiment file must
declare exactly these phases (in this order: it is the order the DAG chains them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MissionImpl:
    module: str  # imported only inside a running task
    phases: tuple[str, ...]
    params_model: str  # "module:Class", a pydantic model for the experiment's `params`


IMPLEMENTED: dict[str, MissionImpl] = {
    "mission_a": MissionImpl(
        module="bem_tasks.missions.mission_a",
        phases=(
            "prepare",
            "pretrain_base",
            "train_experts",
            "behavioral_cloning",
            "policy_gradient",
            "evaluate",
        ),
        params_model="bem_tasks.missions.mission_a_params:MissionAParams",
    ),
    "mission_b": MissionImpl(
        module="bem_tasks.missions.mission_b",
        phases=("prepare", "shadow", "canary_gate", "online", "evaluate"),
        params_model="bem_tasks.missions.mission_b_params:MissionBParams",
    ),
    "mission_c": MissionImpl(
        module="bem_tasks.missions.mission_c",
        phases=(
            "prepare",
            "pretrain_base",
            "train_safety_basis",
            "safety_evaluation",
            "knob_sweep",
        ),
        params_model="bem_tasks.missions.mission_c_params:MissionCParams",
    ),
    "mission_d": MissionImpl(
        module="bem_tasks.missions.mission_d",
        phases=("prepare", "pretrain", "ood_evaluation"),
        params_model="bem_tasks.missions.mission_d_params:MissionDParams",
    ),
    "mission_e": MissionImpl(
        module="bem_tasks.missions.mission_e",
        phases=("prepare", "train_memory_coupling", "long_context_evaluation"),
        params_model="bem_tasks.missions.mission_e_params:MissionEParams",
    ),
}
