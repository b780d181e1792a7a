"""Rank processes for the CPU distributed tests, forked from a server that has already imported torch and the trainer.

A spawned rank imports torch and the project from scratch: seconds of CPU per rank, most of a test's time when 8
ranks share 2 cores. The fork server imports them once (on first use in the session); each rank is a fresh fork
of it, not of pytest, so it holds no process group, threads or state of the tests that ran before. Ranks see the
environment the server started with, as spawned ones saw pytest's: each worker sets its own RANK/WORLD_SIZE.
"""
import multiprocessing

import torch.multiprocessing as mp

_PRELOAD = ["torch", "torch.distributed", "train.builder", "train.config", "train.runtime", "train.step"]


def start_ranks(worker, args, nprocs: int) -> None:
    """worker(rank, *args) in `nprocs` processes; returns when all finished, raises if one failed."""
    multiprocessing.set_forkserver_preload(_PRELOAD)  # read only when the server starts
    mp.start_processes(worker, args=args, nprocs=nprocs, start_method="forkserver", join=True)
