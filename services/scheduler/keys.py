"""Redis key names of the scheduler: the one place they are defined.

Python calls the functions below; the Lua scripts get the same names as Lua functions and
constants generated from ``PER_JOB``, ``PER_LLM`` and ``GLOBAL`` (``lua_prelude``, which
store.py prepends to every script), so a key's spelling never exists twice.

Layout (``ssjf:`` prefix; see docs/scheduler.md):

* ``job:<id>``          hash, the job record (JobRecord fields plus lease and index fields)
* ``events:<id>``       stream, the job's token batches then an ``end`` marker
* ``idem:<client id>``  string -> job id (idempotent submission)
* ``queue:<llm>``       sorted set, job id by policy score (lower first)
* ``arrivals:<llm>``    sorted set, job id by submission time (the max-wait guard)
* ``running:<llm>``     set, leased job ids
* ``notify:<llm>``      list, one wake-up per queued job for workers blocked in BLPOP
* ``metrics:<llm>``     hash, counters (submitted, prediction_fallback, completed, ...)
* ``leases``            sorted set, leased job id by lease expiry (the reaper's index)
* ``deadlines``         sorted set, never-started job id by start deadline
* ``llms``              set, LLM names that have had a queue
* ``completions``       capped stream: (prompt, llm, generated_tokens) of finished jobs
* ``worker:<id>``       string, a live worker's LLM names (JSON); expires with its registration
* ``workers``           sorted set, worker id by registration expiry (index of worker:<id>)
* ``llms_seen``         sorted set, LLM name by the last time a worker registered it
"""

from __future__ import annotations

PREFIX = "ssjf:"

# Lua function name -> key part before the job id / client id.
PER_JOB = {
    "job_key": "job:",
    "events_key": "events:",
    "idempotency_key": "idem:",
    "worker_key": "worker:",  # per worker id (the live-worker registry)
}
# Lua function name -> key part before the LLM name.
PER_LLM = {
    "queue_key": "queue:",
    "arrivals_key": "arrivals:",
    "running_key": "running:",
    "notify_key": "notify:",
    "metrics_key": "metrics:",
}
# Lua constant name -> key part.
GLOBAL = {
    "LEASES": "leases",
    "DEADLINES": "deadlines",
    "LLMS": "llms",
    "COMPLETIONS": "completions",
    "WORKERS": "workers",
    "LLMS_SEEN": "llms_seen",
}

LEASES_KEY = PREFIX + GLOBAL["LEASES"]
DEADLINES_KEY = PREFIX + GLOBAL["DEADLINES"]
LLMS_KEY = PREFIX + GLOBAL["LLMS"]
COMPLETIONS_KEY = PREFIX + GLOBAL["COMPLETIONS"]
WORKERS_KEY = PREFIX + GLOBAL["WORKERS"]
LLMS_SEEN_KEY = PREFIX + GLOBAL["LLMS_SEEN"]


def job_key(job_id: str) -> str:
    return PREFIX + PER_JOB["job_key"] + job_id


def events_key(job_id: str) -> str:
    return PREFIX + PER_JOB["events_key"] + job_id


def idempotency_key(client_request_id: str) -> str:
    return PREFIX + PER_JOB["idempotency_key"] + client_request_id


def worker_key(worker_id: str) -> str:
    return PREFIX + PER_JOB["worker_key"] + worker_id


def queue_key(llm: str) -> str:
    return PREFIX + PER_LLM["queue_key"] + llm


def arrivals_key(llm: str) -> str:
    return PREFIX + PER_LLM["arrivals_key"] + llm


def running_key(llm: str) -> str:
    return PREFIX + PER_LLM["running_key"] + llm


def notify_key(llm: str) -> str:
    return PREFIX + PER_LLM["notify_key"] + llm


def metrics_key(llm: str) -> str:
    return PREFIX + PER_LLM["metrics_key"] + llm


def lua_prelude() -> str:
    """The same key names as Lua: one function per per-job/per-LLM key, one constant per
    global key."""
    lines = [
        "-- Generated from services/scheduler/keys.py (the one definition of key names).",
        f"local PREFIX = '{PREFIX}'",
    ]
    for name, part in (PER_JOB | PER_LLM).items():
        lines.append(f"local function {name}(name) return PREFIX .. '{part}' .. name end")
    for name, part in GLOBAL.items():
        lines.append(f"local {name} = PREFIX .. '{part}'")
    return "\n".join(lines) + "\n"
