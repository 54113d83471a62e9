"""Training: the loop and its parts (step, optimizer and learning rate, runners, stage wiring,
checkpoints, metrics, data, config validation)."""

from ..data import DATASETS, DataError, Dataset, load_dataset, minibatches, num_batches
from .attempts import ATTEMPTS, FAILURE, prepare_run_dir, read_attempts, restart_count
from .bootstrap import Job, join_job
from .callbacks import Callback
from .checkpoint import Checkpointer, CheckpointError, compare_runs, load_run_weights
from .loop import Progress, open_run, train
from .runner import PipelineRunner, Runner, SingleRunner, evaluate
from .stage import Stage, build_stage, schedule_spec
from .step import OptimizerStep, TrainingError, build_optimizer, learning_rate
from .validate import validate_config

__all__ = [
    "ATTEMPTS",
    "DATASETS",
    "Callback",
    "CheckpointError",
    "Checkpointer",
    "DataError",
    "FAILURE",
    "Dataset",
    "Job",
    "OptimizerStep",
    "PipelineRunner",
    "Progress",
    "Runner",
    "SingleRunner",
    "Stage",
    "TrainingError",
    "build_optimizer",
    "build_stage",
    "compare_runs",
    "evaluate",
    "join_job",
    "learning_rate",
    "load_dataset",
    "load_run_weights",
    "minibatches",
    "open_run",
    "num_batches",
    "prepare_run_dir",
    "read_attempts",
    "restart_count",
    "schedule_spec",
    "train",
    "validate_config",
]
