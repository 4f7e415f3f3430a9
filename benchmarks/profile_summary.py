"""Where a compiled step spends its device time: a table from a `jax.profiler` trace.

    summary = profile_summary.trace_ops(run_steps, compiled_hlo_text, logdir)
    print(profile_summary.format_table(summary, top=25))

The trace's op events (GPU kernels, TPU ops, or XLA CPU thunks; every event that
carries an `hlo_op` stat) are summed per HLO instruction of the step's module, and each
instruction is named by the JAX operation its fusion root came from (the
`metadata={op_name=...}` of the optimised HLO), so that "fusion.412" reads as
"jit(train_step)/.../Attention/softmax".  Used by `benchmarks.train_step --profile`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
from typing import Callable

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


@dataclasses.dataclass(frozen=True)
class OpTime:
    hlo_op: str
    op_name: str  # the JAX operation behind it ("" when the HLO carries no metadata)
    seconds_per_step: float
    share: float  # of the step module's summed op time


def _source_lines(hlo_text: str) -> dict[int, str]:
    """stack_frame_id -> "file.py:line" of the innermost frame in this project's code
    (else the innermost frame), from the HLO text's FileNames / FileLocations /
    StackFrames tables."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = tables.setdefault(line, {})
        elif section is not None and (row := _TABLE_ROW.match(line)):
            section[int(row.group(1))] = row.group(2)
        elif line.startswith(("%", "ENTRY")):
            section = None  # the instructions begin

    def field(text, key):
        found = re.search(rf"{key}=(\d+)", text)
        return int(found.group(1)) if found else None

    files, locations, frames = (tables.get(k, {}) for k in
                                ("FileNames", "FileLocations", "StackFrames"))

    def location_of(frame_id):
        location = locations.get(field(frames[frame_id], "file_location_id"), "")
        path = files.get(field(location, "file_name_id"), "").strip('"')
        return path, field(location, "line")

    out = {}
    for first in frames:
        frame_id, seen, innermost = first, set(), ""
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            path, line = location_of(frame_id)
            where = f"{os.path.basename(path)}:{line}" if path else ""
            innermost = innermost or where
            if "ct_rate_jax" in path:
                innermost = where
                break
            # The printed parent_frame_id counts from 1 one past the table's own ids
            # (0 would be "no parent"): frame k's caller is row parent_frame_id - 1.
            parent = field(frames[frame_id], "parent_frame_id")
            frame_id = parent - 1 if parent else None
        out[first] = innermost
    return out


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> "JAX op_name @ file.py:line" (optimised HLO text)."""
    sources = _source_lines(hlo_text)
    names = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        op_name = _OP_NAME.search(match.group(2))
        frame = _FRAME_ID.search(match.group(2))
        where = sources.get(int(frame.group(1)), "") if frame else ""
        name = op_name.group(1) if op_name else ""
        names[match.group(1)] = f"{name} @ {where}" if where else name
    return names


def _device_planes(profile):
    planes = [p for p in profile.planes if p.name.startswith("/device:")]
    return planes or [p for p in profile.planes if p.name == "/host:CPU"]


def op_times(xplane_path: str, hlo_text: str, steps: int) -> list[OpTime]:
    """Per-HLO-op device seconds per step of the module that took the most time."""
    profile = jax.profiler.ProfileData.from_file(xplane_path)
    per_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for plane in _device_planes(profile):
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    module = str(stats.get("hlo_module", ""))
                    per_module[module][str(stats["hlo_op"])] += event.duration_ns * 1e-9
    if not per_module:
        raise ValueError(f"{xplane_path}: the trace holds no op events with an hlo_op stat")
    module = max(per_module, key=lambda m: sum(per_module[m].values()))
    totals = per_module[module]
    total = sum(totals.values())
    names = hlo_op_names(hlo_text)
    return [OpTime(op, names.get(op, ""), seconds / steps, seconds / total)
            for op, seconds in totals.most_common()]


def trace_ops(run_steps: Callable[[int], object], hlo_text: str, logdir: str,
              steps: int = 2) -> list[OpTime]:
    """Traces `run_steps(steps)` (which must block until done) and summarises it."""
    with jax.profiler.trace(logdir):
        run_steps(steps)
    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb written under {logdir}")
    return op_times(paths[-1], hlo_text, steps)


def _short(op_name: str, width: int) -> str:
    # The leading "jit(...)/" and transformation wrappers say little; keep the tail.
    return op_name if len(op_name) <= width else "..." + op_name[-(width - 3):]


def by_source(ops: list[OpTime]) -> list[OpTime]:
    """The same time summed per JAX op and source line, forward and backward apart
    ("bwd" when the op comes from a `transpose(...)`, i.e. the gradient)."""
    groups: dict[str, list[OpTime]] = collections.defaultdict(list)
    for op in ops:
        name, _, where = op.op_name.partition(" @ ")
        primitive = name.rsplit("/", 1)[-1] if name else op.hlo_op.split(".")[0]
        direction = "bwd" if "transpose(" in name else "fwd"
        groups[f"{direction} {primitive} @ {where or '?'}"].append(op)
    merged = [OpTime(f"{len(group)} ops", key, sum(o.seconds_per_step for o in group),
                     sum(o.share for o in group)) for key, group in groups.items()]
    return sorted(merged, key=lambda o: -o.seconds_per_step)


def format_table(ops: list[OpTime], top: int = 25, width: int = 100) -> str:
    """A markdown table of the `top` ops by time, plus the rest in one row."""
    rows = ["| ms/step | share | HLO op | JAX op |", "|---|---|---|---|"]
    for op in ops[:top]:
        rows.append(f"| {op.seconds_per_step * 1e3:.2f} | {100 * op.share:.1f}% | "
                    f"{op.hlo_op} | {_short(op.op_name, width)} |")
    rest = ops[top:]
    if rest:
        rows.append(f"| {sum(o.seconds_per_step for o in rest) * 1e3:.2f} | "
                    f"{100 * sum(o.share for o in rest):.1f}% | {len(rest)} more ops | |")
    total = sum(o.seconds_per_step for o in ops)
    rows.append(f"summed op time {total * 1e3:.2f} ms/step over {len(ops)} HLO ops")
    return "\n".join(rows)
