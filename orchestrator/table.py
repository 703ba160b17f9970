"""Render `status` as aligned text tables for the CLI."""
from __future__ import annotations


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _table(headers: list, rows: list) -> str:
    cells = [headers] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _gpu_mem(w: dict) -> str:
    mems = w.get("gpu_memory") or []
    return " ".join(f"{m['device']}:{m['used_bytes'] / 2**30:.1f}/{m['total_bytes'] / 2**30:.0f}G"
                    for m in mems) or "-"


def render_status(st: dict) -> str:
    out = [f"coordinator {st['state']}  endpoint {st['endpoint']}  pid {st['pid']}  "
           f"uptime {st['uptime']:.0f}s  unfinished {st['jobs_unfinished']}"]
    pool_rows = [[name, p["handler"], p["tp"], p["health"], p["desired"], p["queue_depth"], p["inflight"],
                  p["completed"], p["failed"], p["throughput_1m"]] for name, p in st["pools"].items()]
    out += ["", _table(["POOL", "HANDLER", "TP", "HEALTH", "DESIRED", "QUEUED", "INFLIGHT", "DONE",
                        "FAILED", "JOBS/S(1m)"], pool_rows)]
    rows = []
    for p in st["pools"].values():
        for w in p["workers"]:
            rows.append([w["name"], w["state"], ",".join(w["devices"]),
                         ",".join(map(str, w["pids"])) or "-", f"{w['inflight']}/{w['capacity']}",
                         w["completed"], w["failed"], w["restarts"], w["heartbeat_age"], w["step_age"],
                         _gpu_mem(w), w["last_exit_reason"]])
    out += ["", _table(["WORKER", "STATE", "DEVICES", "PIDS", "JOBS", "DONE", "FAILED", "RESTARTS",
                        "HB_AGE", "STEP_AGE", "GPU_MEM", "LAST_EXIT"], rows)]
    return "\n".join(out)
