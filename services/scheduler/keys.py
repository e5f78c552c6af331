"""Redis key names of the scheduler: the one place they are defined.

Python calls the functions below; the Lua scripts get the same names as Lua functions and
constants generated from ``PER_JOB``, ``PER_LLM`` and ``GLOBAL`` (``lua_prelude``, which
store.py prepends to every script), so a key's spelling never exists twice.

Layout (``ssjf:`` prefix; see docs/scheduler.md):

``{T}`` is the hash tag of the job's or LLM's queue (below); ``<id>`` a job id, whose first
8 characters are that tag.

* ``job:{T}<id rest>``        hash, the job record (JobRecord fields plus lease and index fields)
* ``events:{T}<id rest>``     stream, the job's token batches then an ``end`` marker
* ``idem:{T}<client id>``     string -> job id (idempotent submission, per LLM)
* ``queue:{T}<llm>``          sorted set, job id by policy score (lower first)
* ``arrivals:{T}<llm>``       sorted set, job id by submission time (the max-wait guard)
* ``running:{T}<llm>``        set, leased job ids
* ``notify:{T}<llm>``         list, one wake-up per queued job for workers blocked in BLPOP
* ``metrics:{T}<llm>``        hash, counters (submitted, prediction_fallback, completed, ...)
* ``leases:{T}<llm>``         sorted set, leased job id by lease expiry (the reaper's index)
* ``deadlines:{T}<llm>``      sorted set, never-started job id by start deadline
* ``completions:{T}<llm>``    capped stream: (prompt, llm, generated_tokens) of finished jobs
* ``llms``                    set, LLM names that have had a queue (written outside scripts)
* ``worker:<id>``             string, a live worker's LLM names (JSON), expiring with it
* ``workers``                 sorted set, worker id by registration expiry (index of worker:<id>)
* ``llms_seen``               sorted set, LLM name by the last time a worker registered it
* ``tenant-jobs:<tenant>``    sorted set, a capped tenant's unfinished job ids by reservation
                              time (tenants.py; no lifecycle script touches it)
"""

from __future__ import annotations

import hashlib

PREFIX = "ssjf:"

# Redis Cluster: every key a script touches must hash to one slot. Each LLM queue has a hash
# tag, ``{<8 hex of sha1(llm)>}``, in all of its keys; a job id starts with its queue's tag
# (see new_job_tag), and its keys put those 8 characters in braces. So one queue, its jobs,
# their streams, leases and counters live in one slot, and different LLMs spread over the
# shards. On a single Redis the tags change nothing. See docs/deploy.md.
TAG_CHARS = 8

# Lua function name -> key part before the job id (tagged by the id's first TAG_CHARS).
PER_JOB = {"job_key": "job:", "events_key": "events:"}
# Lua function name -> key part before the LLM's tag and name.
PER_LLM = {
    "queue_key": "queue:",
    "arrivals_key": "arrivals:",
    "running_key": "running:",
    "notify_key": "notify:",
    "metrics_key": "metrics:",
    "leases_key": "leases:",
    "deadlines_key": "deadlines:",
    "completions_key": "completions:",
}
# Lua function name (of llm, client id) -> key part before the LLM's tag and the client id.
PER_LLM_ITEM = {"idempotency_key": "idem:"}
# Lua constant name -> key part. Only read or written outside the scripts (cluster-safe).
GLOBAL = {"LLMS": "llms", "WORKERS": "workers", "LLMS_SEEN": "llms_seen"}

LLMS_KEY = PREFIX + GLOBAL["LLMS"]
# The live-worker registry (written by plain commands, never by the scripts).
WORKERS_KEY = PREFIX + GLOBAL["WORKERS"]
LLMS_SEEN_KEY = PREFIX + GLOBAL["LLMS_SEEN"]
# Per tenant, read and written outside the lifecycle scripts (tenants.py), so untagged.
TENANT_JOBS_PREFIX = PREFIX + "tenant-jobs:"


def llm_tag(llm: str) -> str:
    """The hash tag of an LLM's queue: the same in Python and Lua (redis.sha1hex)."""
    return hashlib.sha1(llm.encode()).hexdigest()[:TAG_CHARS]


def _per_llm(part: str, llm: str) -> str:
    return f"{PREFIX}{part}{{{llm_tag(llm)}}}{llm}"


def _per_job(part: str, job_id: str) -> str:
    return f"{PREFIX}{part}{{{job_id[:TAG_CHARS]}}}{job_id[TAG_CHARS:]}"


def job_key(job_id: str) -> str:
    return _per_job(PER_JOB["job_key"], job_id)


def events_key(job_id: str) -> str:
    return _per_job(PER_JOB["events_key"], job_id)


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def tenant_jobs_key(tenant: str) -> str:
    return TENANT_JOBS_PREFIX + tenant


def job_id_of_key(key: str) -> str:
    """The job id a job_key()/events_key() names (the inverse of their tagging)."""
    rest = key.removeprefix(PREFIX).split(":", 1)[1]
    return rest.replace("{", "", 1).replace("}", "", 1)


def idempotency_key(llm: str, client_request_id: str) -> str:
    return f"{PREFIX}{PER_LLM_ITEM['idempotency_key']}{{{llm_tag(llm)}}}{client_request_id}"


def queue_key(llm: str) -> str:
    return _per_llm(PER_LLM["queue_key"], llm)


def arrivals_key(llm: str) -> str:
    return _per_llm(PER_LLM["arrivals_key"], llm)


def running_key(llm: str) -> str:
    return _per_llm(PER_LLM["running_key"], llm)


def notify_key(llm: str) -> str:
    return _per_llm(PER_LLM["notify_key"], llm)


def metrics_key(llm: str) -> str:
    return _per_llm(PER_LLM["metrics_key"], llm)


def leases_key(llm: str) -> str:
    return _per_llm(PER_LLM["leases_key"], llm)


def deadlines_key(llm: str) -> str:
    return _per_llm(PER_LLM["deadlines_key"], llm)


def completions_key(llm: str) -> str:
    return _per_llm(PER_LLM["completions_key"], llm)


def lua_prelude() -> str:
    """The same key names as Lua: one function per per-job/per-LLM key, one constant per
    global key."""
    lines = [
        "-- Generated from services/scheduler/keys.py (the one definition of key names).",
        f"local PREFIX = '{PREFIX}'",
        "local function llm_tag(llm)",
        f"  return '{{' .. string.sub(redis.sha1hex(llm), 1, {TAG_CHARS}) .. '}}'",
        "end",
        "local function job_tag(id)",
        f"  return '{{' .. string.sub(id, 1, {TAG_CHARS}) .. '}}' "
        f".. string.sub(id, {TAG_CHARS + 1})",
        "end",
    ]
    for name, part in PER_JOB.items():
        lines.append(f"local function {name}(id) return PREFIX .. '{part}' .. job_tag(id) end")
    for name, part in PER_LLM.items():
        lines.append(
            f"local function {name}(llm) return PREFIX .. '{part}' .. llm_tag(llm) .. llm end"
        )
    for name, part in PER_LLM_ITEM.items():
        lines.append(
            f"local function {name}(llm, item) return PREFIX .. '{part}' .. llm_tag(llm) "
            ".. item end"
        )
    for name, part in GLOBAL.items():
        lines.append(f"local {name} = PREFIX .. '{part}'")
    return "\n".join(lines) + "\n"
