"""Checkpoint cost at scale, on paper: size, write time, blocking time, how often to save (Lesson 11, §5).

Young's rule: with C seconds of lost training per checkpoint and a mean time between failures M,
saving every sqrt(2·C·M) seconds minimises the time lost to saving plus the work redone after a
failure (on average half an interval).
"""
from __future__ import annotations

import math

from mvtk.errors import check_number

__all__ = ["MIXED_PRECISION_ADAM", "checkpoint_plan", "advice"]

# Bytes per parameter in a training checkpoint of bf16 mixed-precision training with Adam.
MIXED_PRECISION_ADAM = {"bf16 weights": 2, "fp32 master weights": 4, "Adam exp_avg (fp32)": 4,
                        "Adam exp_avg_sq (fp32)": 4}


def checkpoint_plan(params: float, gpus: int, *, rank_bandwidth: float, storage_bandwidth: float,
                    blocking_ratio: float, gpu_mtbf_hours: float, restart_s: float = 600.0,
                    bytes_per_param: float = sum(MIXED_PRECISION_ADAM.values())) -> dict[str, float]:
    """A worked estimate of one sharded checkpoint's cost and the best interval between two (Lesson 11, §5).

    Every rank writes its 1/gpus share at `rank_bandwidth` B/s, and all together at most at the
    shared storage's `storage_bandwidth` B/s. An asynchronous save blocks training for
    `blocking_ratio` × the write time. The job fails every gpu_mtbf_hours / gpus hours; each failure
    costs `restart_s` plus the work since the last checkpoint. Returns sizes (B), times (s), the
    interval (s), the fraction of training time lost, and `one_writer_s`: the time rank 0 alone
    would need to write everything (torch.save).
    """
    for name, value in (("params", params), ("gpus", gpus), ("rank_bandwidth", rank_bandwidth),
                        ("storage_bandwidth", storage_bandwidth), ("gpu_mtbf_hours", gpu_mtbf_hours),
                        ("bytes_per_param", bytes_per_param)):
        check_number(value, name, low=0, low_open=True)
    check_number(blocking_ratio, "blocking_ratio", low=0, high=1)
    size = params * bytes_per_param
    per_rank = size / gpus
    write_s = max(per_rank / rank_bandwidth, size / storage_bandwidth)
    blocked_s = blocking_ratio * write_s
    mtbf_s = gpu_mtbf_hours * 3600 / gpus
    interval_s = max(math.sqrt(2 * blocked_s * mtbf_s), write_s)  # an async save must end before the next
    lost = blocked_s / interval_s + (interval_s / 2 + restart_s) / mtbf_s
    return {"size_bytes": size, "per_rank_bytes": per_rank, "write_s": write_s, "blocked_s": blocked_s,
            "one_writer_s": size / rank_bandwidth,  # torch.save of everything by rank 0 alone
            "storage_bound": float(size / storage_bandwidth > per_rank / rank_bandwidth),
            "job_mtbf_s": mtbf_s, "interval_s": interval_s, "lost_fraction": lost}


def advice(plan: dict[str, float]) -> str:
    """What to change first for a plan from `checkpoint_plan`, judged from its numbers (Lesson 11, §5)."""
    if plan["lost_fraction"] > 0.5:
        return "failures outpace progress: fewer, more reliable machines, or in-memory (peer) checkpoints"
    if plan["job_mtbf_s"] < 20 * plan["write_s"]:
        return "failures come every few saves: in-memory copies on peers, storage less often, fast restarts"
    if plan["one_writer_s"] < 0.05 * plan["interval_s"]:
        return "torch.save from rank 0 is fast enough; resume exactly (lesson 03)"
    if plan["storage_bound"]:
        return "storage-bound: sharded async saves; faster storage or fewer bytes (drop the bf16 copy)"
    return "one writer is too slow: every rank writes its shard (DCP), asynchronously"
