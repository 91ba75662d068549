"""Beyond one machine (Lesson 11): multi-node and elastic torchrun, sharded DCP checkpoints, FSDP2, scale.

`launch_nodes` starts several torchrun agents on this machine, one per "node"; `train_steps` is the
tiny run that gives the same weights on 1 process or N and resumes after a crash; `save_sharded` /
`load_sharded` write and read DCP checkpoints with a `latest` pointer; `train_fsdp` trains a sharded
model; `checkpoint_plan` estimates checkpoint cost for a large job. The workers are
`python -m mvtk.distributed TASK` (see __main__.py).
"""
from mvtk.distributed.elastic import (CLASSES, FEATURES, FINAL_NAME, LOG_NAME, RESTART_ENV, read_log, tiny_dataset,
                                      tiny_model, train_steps)
from mvtk.distributed.launch import (AGENT, FRESH_STORE_ENV, TAG_ENV, WORKER, NodesRun, kill_during_save, launch_nodes,
                                     local_endpoint, node_command, processes_tagged, stop_tagged, worker_results)
from mvtk.distributed.scale import MIXED_PRECISION_ADAM, advice, checkpoint_plan
from mvtk.distributed.sharded import (LATEST, METADATA, PAUSED_MARK, PendingSave, checkpoint_files, close_async_saves,
                                      example_state,
                                      from_torch_save, latest_folder, load_sharded, save_sharded, shard_state,
                                      state_bytes, state_equal, step_folder, to_torch_save, zeros_like_state)

__all__ = [
    "CLASSES", "FEATURES", "FINAL_NAME", "LOG_NAME", "RESTART_ENV", "read_log", "tiny_dataset", "tiny_model",
    "train_steps",
    "AGENT", "FRESH_STORE_ENV", "TAG_ENV", "WORKER", "NodesRun", "kill_during_save", "launch_nodes", "local_endpoint", "node_command",
    "processes_tagged", "stop_tagged", "worker_results",
    "MIXED_PRECISION_ADAM", "advice", "checkpoint_plan",
    "LATEST", "METADATA", "PAUSED_MARK", "PendingSave", "checkpoint_files", "example_state", "from_torch_save",
    "latest_folder", "load_sharded", "save_sharded", "close_async_saves", "shard_state", "state_bytes", "state_equal", "step_folder",
    "to_torch_save", "zeros_like_state",
]
