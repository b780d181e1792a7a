"""Merge all ranks' loader states into one global position, to resume on a different number of ranks.

At a checkpoint, rank r has consumed every position of its class below its own resume position, plus a
prefix of the document at that position. The merged state starts at the smallest resume position and lists
the positions above it that are already consumed (skip) or half consumed (partial), so the new ranks,
dealing positions from there afresh, neither repeat nor miss a document.
"""
from __future__ import annotations

from typing import List


def merge_states(states: List[dict], world_size: int) -> dict:
    if not states:
        raise ValueError("loader state: empty list of rank states")
    streams = [s["stream"] for s in states]
    old_world, base = streams[0]["world_size"], streams[0]["base"]
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(old_world)) or any(st["world_size"] != old_world or st["base"] != base for st in streams):
        raise ValueError(f"loader state: need the states of all {old_world} ranks of one checkpoint, got ranks {ranks}")
    first = min(range(len(states)), key=lambda i: streams[i]["pos"])
    new_base = streams[first]["pos"]
    skip: set = set()
    partial: dict = {}  # position -> tokens already used
    for s, st in zip(states, streams):
        r, pos = s["rank"], st["pos"]
        p = base + r + max(0, -(-(new_base - base - r) // old_world)) * old_world  # first class-r position >= new_base
        while p < pos:
            skip.add(p)
            p += old_world
        skip.update(q for q in st["skip"] if q >= new_base)
        for q, off in st["partial"]:
            if q > pos:
                partial[q] = off
            elif q == pos and off > 0:
                partial[q] = off
            elif q >= new_base:
                skip.add(q)
    skip -= set(partial)
    return {"pos": new_base, "active": streams[first]["active"], "cursors": streams[first]["cursors"],
            "base": new_base, "world_size": world_size, "skip": sorted(skip),
            "partial": sorted([q, o] for q, o in partial.items()), "done": all(st.get("done") for st in streams)}


def merge_stats(states: List[dict]) -> dict:
    total: dict = {}
    for s in states:
        for k, v in s["stats"].items():
            total[k] = total.get(k, 0) + v if k != "epoch" else max(total.get(k, 0), v)
    return total
