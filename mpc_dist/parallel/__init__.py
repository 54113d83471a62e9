"""The parallel machinery: topology and process groups, partitions, schedules as data (with
generation, validation and simulation), point-to-point messages, the runtime and the watchdog."""

from .generate import generate, validate
from .groups import (
    Groups,
    all_reduce_gradients,
    broadcast_parameters,
    check_same_config,
    device_and_backend,
    init_process_group,
    launched_world_size,
    place_ranks,
)
from .mailbox import Mailbox
from .partition import balanced_partition, block_costs, partition, stage_ranges, uniform_partition
from .runtime import PipelineRuntime, RuntimeOptions, StageTimes, StepFunction
from .schedule import (
    COMPUTE,
    Action,
    Costs,
    Event,
    Schedule,
    ScheduleError,
    action_costs,
    bubble_fraction,
    busy_time,
    check_rendezvous,
    held_microbatches,
    peer,
    send_order,
    simulate,
    steady_state,
    unit_costs,
)
from .topology import Topology, pack_pipelines, spanning_pipelines
from .watchdog import Watchdog

__all__ = [
    "COMPUTE",
    "Action",
    "Costs",
    "Event",
    "Groups",
    "Mailbox",
    "PipelineRuntime",
    "RuntimeOptions",
    "Schedule",
    "ScheduleError",
    "StageTimes",
    "StepFunction",
    "Topology",
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
    "launched_world_size",
    "pack_pipelines",
    "place_ranks",
    "partition",
    "peer",
    "send_order",
    "simulate",
    "spanning_pipelines",
    "stage_ranges",
    "steady_state",
    "uniform_partition",
    "unit_costs",
    "validate",
]
