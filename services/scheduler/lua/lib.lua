-- Shared by every SSJF script (prepended to each one by store.py, so they stay atomic
-- single-script calls). Key names (job_key, queue_key, leases_key, ...) come from the prelude
-- store.py generates from services/scheduler/keys.py, their one definition.
local NOTIFY_CAP = 1024

-- Redis's clock, in seconds: leases, deadlines and aging compare times written by any
-- replica, so they all read this one clock, not each replica's own.
local function server_time()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

-- A time argument: '' means "now, by Redis's clock"; tests and the simulator pass their own.
local function time_arg(value)
  if value == nil or value == '' then return server_time() end
  return tonumber(value)
end

local function count(llm, name)
  redis.call('HINCRBY', metrics_key(llm), name, 1)
end

-- Wakes one worker blocked in BLPOP on this LLM; the cap bounds tokens nobody waits for.
local function notify(llm)
  local key = notify_key(llm)
  redis.call('LPUSH', key, '1')
  redis.call('LTRIM', key, 0, NOTIFY_CAP - 1)
end

local function is_finished(state)
  return state == 'DONE' or state == 'FAILED' or state == 'CANCELLED'
end

-- Puts a leased job back in its queue with its original score and arrival (aging and the
-- max-wait guard still count its first submission); extra record fields are set too.
local function requeue(id, llm, score, arrival, ...)
  redis.call('ZREM', leases_key(llm), id)
  redis.call('SREM', running_key(llm), id)
  redis.call('HSET', job_key(id), 'state', 'QUEUED', 'lease_id', '', 'worker_id', '',
    'lease_expires_at', 0, ...)
  redis.call('ZADD', queue_key(llm), score, id)
  redis.call('ZADD', arrivals_key(llm), arrival, id)
  notify(llm)
end

local FINISH_COUNTER = {DONE = 'completed', FAILED = 'failed', CANCELLED = 'cancelled'}

-- Ends a job in any live state: out of every index, summary marker on its event stream,
-- record, stream and idempotency key expire after ttl seconds.
local function finish(id, state, reason, err, now, ttl)
  local key = job_key(id)
  local llm, crid = unpack(redis.call('HMGET', key, 'llm', 'client_request_id'))
  redis.call('HSET', key, 'state', state, 'finish_reason', reason, 'error', err,
    'finished_at', now, 'lease_id', '', 'lease_expires_at', 0)
  redis.call('ZREM', queue_key(llm), id)
  redis.call('ZREM', arrivals_key(llm), id)
  redis.call('ZREM', deadlines_key(llm), id)
  redis.call('ZREM', leases_key(llm), id)
  redis.call('SREM', running_key(llm), id)
  redis.call('XADD', events_key(id), '*', 'k', 'end')
  redis.call('EXPIRE', key, ttl)
  redis.call('EXPIRE', events_key(id), ttl)
  if crid and crid ~= '' then
    redis.call('EXPIRE', idempotency_key(llm, crid), ttl)
  end
  count(llm, FINISH_COUNTER[state])
  if reason == 'DEADLINE' then count(llm, 'deadline_missed') end
end
