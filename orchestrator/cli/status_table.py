"""Render `status` as aligned text tables for the CLI (`orchestrator status`)."""
from __future__ import annotations

GiB, MiB = 2**30, 2**20


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
    """used/total per device, e.g. `0:12.3/80G 1:0.4/80G`."""
    return " ".join(f"{m['device']}:{m['used_bytes'] / GiB:.1f}/{m['total_bytes'] / GiB:.0f}G"
                    for m in w.get("gpu_memory") or []) or "-"


def _rss(w: dict) -> str:
    return "-" if w.get("rss_bytes") is None else f"{w['rss_bytes'] / MiB:.0f}M"


def _pool_rows(st: dict) -> list:
    return [[name, p["handler"], p["tp"], p["health"], p["desired"], p["queue_depth"], p["inflight"],
             p["completed"], p["failed"], p["throughput_1m"]] for name, p in st["pools"].items()]


def _where(w: dict) -> str:
    """Its host(s); for a Ray-placed worker also its node id(s) (first 8 characters): `vm/f7513409`."""
    hosts = ",".join(w.get("hosts") or []) or "-"
    nodes = ",".join(n[:8] for n in w.get("nodes") or [])
    return f"{hosts}/{nodes}" if nodes else hosts


def _worker_row(w: dict) -> list:
    return [w["name"], w["state"], ",".join(w["devices"]), ",".join(map(str, w["pids"])) or "-", _where(w),
            f"{w['inflight']}/{w['capacity']}", w["completed"], w["failed"], w["restarts"],
            w["heartbeat_age"], w["step_age"], _rss(w), _gpu_mem(w), w["last_exit_reason"]]


def render_status(st: dict) -> str:
    """A header line, a pool table and a worker table (one row per worker slot)."""
    out = [f"coordinator {st['state']}  endpoint {st['endpoint']}  pid {st['pid']}  "
           f"uptime {st['uptime']:.0f}s  unfinished {st['jobs_unfinished']}"]
    out += ["", _table(["POOL", "HANDLER", "TP", "HEALTH", "DESIRED", "QUEUED", "INFLIGHT", "DONE",
                        "FAILED", "JOBS/S(1m)"], _pool_rows(st))]
    rows = [_worker_row(w) for p in st["pools"].values() for w in p["workers"]]
    out += ["", _table(["WORKER", "STATE", "DEVICES", "PIDS", "HOST/NODE", "JOBS", "DONE", "FAILED",
                        "RESTARTS", "HB_AGE", "STEP_AGE", "RSS", "GPU_MEM(used/total)", "LAST_EXIT"], rows)]
    return "\n".join(out)
