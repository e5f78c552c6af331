-- Shared by every SSJF script (prepended to each one by store.py, so they stay atomic
-- single-script calls). Keys: see docs/scheduler.md "Redis layout".
local PREFIX = 'ssjf:'
local NOTIFY_CAP = 1024

local function job_key(id) return PREFIX .. 'job:' .. id end
local function events_key(id) return PREFIX .. 'events:' .. id end
local function queue_key(llm) return PREFIX .. 'queue:' .. llm end
local function arrivals_key(llm) return PREFIX .. 'arrivals:' .. llm end
local function running_key(llm) return PREFIX .. 'running:' .. llm end
local function notify_key(llm) return PREFIX .. 'notify:' .. llm end
local LEASES = PREFIX .. 'leases'
local DEADLINES = PREFIX .. 'deadlines'

local function count(llm, name)
  redis.call('HINCRBY', PREFIX .. 'metrics:' .. llm, name, 1)
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
  redis.call('ZREM', DEADLINES, id)
  redis.call('ZREM', LEASES, id)
  redis.call('SREM', running_key(llm), id)
  redis.call('XADD', events_key(id), '*', 'k', 'end')
  redis.call('EXPIRE', key, ttl)
  redis.call('EXPIRE', events_key(id), ttl)
  if crid and crid ~= '' then
    redis.call('EXPIRE', PREFIX .. 'idem:' .. crid, ttl)
  end
  count(llm, FINISH_COUNTER[state])
  if reason == 'DEADLINE' then count(llm, 'deadline_missed') end
end
