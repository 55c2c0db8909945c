"""`bench serve` with its time accounted: plan mix, edge and bench CPU per thread, /metrics over the load phase.

Usage (both cores held): THREADS=1 python docs/measurements/serve_throughput_accounting.py CLIENTS SECONDS OUT.json
[EDGE_ARGS='["--max-batch", "64"]'] [EDGE_ENV='{"OMP_WAIT_POLICY": "PASSIVE"}'] (FAM: the family, default reference).
Runs relaydiff.bench.serve.run_serve_bench (no restart: the edge's counters must span the load phase) and wraps its
pieces: the device finishes (thread CPU), the edge process (its args, env and /proc CPU), the load phase's start and
end (/metrics and /proc snapshots). serve_throughput_accounting.json and docs/service.md hold what it measured."""
import json, os, sys, threading, time
import httpx
import relaydiff.bench.serve as bs

clients, duration = int(sys.argv[1]), float(sys.argv[2])
out_path = sys.argv[3]
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
state = {"tally": None, "edge": None, "dev_cpu": 0.0, "dev_wall": 0.0, "dev_n": 0, "dev_tid": None, "marks": {}}

class Tally(bs._Tally):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        state["tally"] = self


bs._Tally = Tally

_fl = bs.finish_locally
def finish_locally(*a, **k):
    state["dev_tid"] = threading.get_native_id()
    c0, w0 = time.thread_time(), time.perf_counter()
    r = _fl(*a, **k)
    state["dev_cpu"] += time.thread_time() - c0; state["dev_wall"] += time.perf_counter() - w0; state["dev_n"] += 1
    return r
bs.finish_locally = finish_locally

_start = bs.EdgeProcess.start
def start(self, *a, **k):
    state["edge"] = self
    return _start(self, *a, **k)
bs.EdgeProcess.start = start

TICK = os.sysconf("SC_CLK_TCK")
def proc_cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK
def tids_cpu(pid):
    d = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
            d[int(t)] = (int(f[11]) + int(f[12])) / TICK
        except OSError:
            pass
    return d
def metrics(url):
    m = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("relaydiff_") and " " in line:
            k, v = line.rsplit(" ", 1)
            m[k] = float(v)
    return m
def snap(name):
    e = state["edge"]
    state["marks"][name] = {"t": time.perf_counter(), "edge_cpu": proc_cpu(e.proc.pid), "edge_tids": tids_cpu(e.proc.pid),
                            "bench_cpu": proc_cpu(os.getpid()), "bench_tids": tids_cpu(os.getpid()),
                            "dev_cpu": state["dev_cpu"], "dev_wall": state["dev_wall"], "dev_n": state["dev_n"],
                            "metrics": metrics(e.url), "host": open("/proc/stat").readline().split()[1:8]}

THREADS = int(os.environ.get("THREADS", "1"))
extra["threads"] = THREADS   # the bench now takes it (edge and baseline)
EDGE_ENV = json.loads(os.environ.get("EDGE_ENV", "{}"))
EDGE_ARGS = json.loads(os.environ.get("EDGE_ARGS", "[]"))
if EDGE_ARGS:
    _init0 = bs.EdgeProcess.__init__
    def _init1(self, *a, **k):
        _init0(self, *a, **k)
        self.args += EDGE_ARGS
    bs.EdgeProcess.__init__ = _init1
if EDGE_ENV:
    import subprocess as _sp
    _Popen = _sp.Popen
    class _P(_Popen):
        def __init__(self, args, *a, **k):
            if k.get("env") is not None:
                k["env"] = {**k["env"], **EDGE_ENV}
            super().__init__(args, *a, **k)
    bs.subprocess.Popen = _P
_loop = bs._device_loop
first = [True]
async def device_loop(*a, **k):
    if first[0]:
        first[0] = False; snap("load_start")
    return await _loop(*a, **k)
bs._device_loop = device_loop
_conf = bs._confirm_done
async def confirm(*a, **k):
    snap("load_end")
    return await _conf(*a, **k)
bs._confirm_done = confirm

rep = bs.run_serve_bench(os.environ.get("FAM", "reference"), clients=clients, duration_s=duration, dropout=0.1, restart=False,
                         calibration_pairs=6, log=lambda s: print(s, file=sys.stderr, flush=True), **extra)
t = state["tally"]
from collections import Counter
kinds = Counter(v["kind"] for v in t.submitted.values())
ks = Counter(v["handoff_step"] for v in t.submitted.values())
shared = Counter(v["shared_steps"] for v in t.submitted.values())
rounds = len({v["round_id"] for v in t.submitted.values()})
a, b = state["marks"]["load_start"], state["marks"]["load_end"]
wall = b["t"] - a["t"]
md = {k: b["metrics"].get(k, 0) - a["metrics"].get(k, 0) for k in b["metrics"]}
edge_t = {tid: b["edge_tids"].get(tid, 0) - a["edge_tids"].get(tid, 0) for tid in b["edge_tids"]}
bench_t = {tid: b["bench_tids"].get(tid, 0) - a["bench_tids"].get(tid, 0) for tid in b["bench_tids"]}
host = [int(y) - int(x) for x, y in zip(a["host"], b["host"])]
acct = {"edge_args": " ".join(state["edge"].args[3:]), "edge_env": EDGE_ENV, "wall_s": wall, "kinds": dict(kinds), "handoff_steps": dict(sorted(ks.items())), "shared_steps": dict(sorted(shared.items())),
        "rounds_seen": rounds, "jobs": len(t.submitted),
        "edge_cpu_s": b["edge_cpu"] - a["edge_cpu"], "edge_threads_cpu_s": sorted((round(v, 2) for v in edge_t.values() if v > 0.5), reverse=True),
        "bench_cpu_s": b["bench_cpu"] - a["bench_cpu"], "bench_threads_cpu_s": {("device" if tid == state["dev_tid"] else str(tid)): round(v, 2) for tid, v in bench_t.items() if v > 0.5},
        "device_finish_cpu_s": b["dev_cpu"] - a["dev_cpu"], "device_finish_wall_s": b["dev_wall"] - a["dev_wall"], "device_finishes": b["dev_n"] - a["dev_n"],
        "host_jiffies_user_nice_sys_idle_iowait": host[:5],
        "metrics_diff": {k: v for k, v in md.items() if ("batch_size" in k or "step_seconds_sum" in k or "step_seconds_count" in k or "round" in k or "completed" in k) and "created" not in k}}
rep["accounting"] = acct
json.dump(rep, open(out_path, "w"), indent=1)
print(json.dumps({k: rep[k] for k in ("submitted", "completed", "lost", "images_per_s", "sequential_images_per_s", "throughput_vs_sequential")}))
print(json.dumps(acct, indent=1))
