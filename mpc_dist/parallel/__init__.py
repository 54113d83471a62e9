"""The parallel machinery: topology and process groups, partitions, the schedule IR (actions,
schedules, generation and validation, simulation, the rendezvous check), point-to-point
messages, the runtime, the watchdog and its flight record. It runs whatever engine it is
handed: it imports ``core``, ``models`` and ``config`` only."""

from .actions import (
    COMPUTE,
    RECEIVES,
    SENDS,
    Action,
    ActionKind,
    Message,
    MessageKind,
    ScheduleError,
    peer,
)
from .flight import FlightRecord, Wait
from .generate import generate, validate_schedule
from .groups import (
    Groups,
    all_reduce_gradients,
    broadcast_parameters,
    check_same_config,
    device_and_backend,
    init_process_group,
    job_token,
    launched_world_size,
    place_ranks,
    shares_agent_store_across_restarts,
)
from .mailbox import Mailbox
from .partition import balanced_partition, block_costs, partition, stage_ranges, uniform_partition
from .rendezvous import check_rendezvous
from .runtime import EventClock, PipelineRuntime, RuntimeOptions, StageTimes, StepFunction
from .schedule import Mode, Policy, Schedule, ScheduleSpec
from .simulate import (
    Costs,
    Event,
    action_costs,
    bubble_fraction,
    busy_time,
    held_microbatches,
    simulate,
    steady_state,
    unit_costs,
)
from .topology import Topology, pack_pipelines, spanning_pipelines
from .watchdog import Watchdog

__all__ = [
    "COMPUTE",
    "RECEIVES",
    "SENDS",
    "Action",
    "ActionKind",
    "Costs",
    "Event",
    "EventClock",
    "FlightRecord",
    "Groups",
    "Mailbox",
    "Message",
    "MessageKind",
    "Mode",
    "PipelineRuntime",
    "Policy",
    "RuntimeOptions",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "StageTimes",
    "StepFunction",
    "Topology",
    "Wait",
    "Watchdog",
    "action_costs",
    "all_reduce_gradients",
    "balanced_partition",
    "block_costs",
    "broadcast_parameters",
    "bubble_fraction",
    "busy_time",
    "check_rendezvous",
    "check_same_config",
    "device_and_backend",
    "generate",
    "held_microbatches",
    "init_process_group",
    "job_token",
    "launched_world_size",
    "pack_pipelines",
    "peer",
    "place_ranks",
    "partition",
    "shares_agent_store_across_restarts",
    "simulate",
    "spanning_pipelines",
    "stage_ranges",
    "steady_state",
    "uniform_partition",
    "unit_costs",
    "validate_schedule",
]
