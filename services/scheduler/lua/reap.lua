-- Run by every replica's reaper, safely concurrent: each step is this one atomic script.
-- 1. Leases past their expiry: the job goes back to its queue with its original score and
--    arrival (so aging and the max-wait guard still count its first submission), or fails
--    once it has been leased max_attempts times.
-- 2. Queued jobs past their start deadline fail with DEADLINE.
-- One LLM's jobs per call (its keys share one Redis Cluster slot).
-- ARGV: now ('': Redis's clock), max_attempts, job_ttl_s, batch, llm.
-- Returns {requeued, failed, deadline_missed}.
local now, max_attempts = time_arg(ARGV[1]), tonumber(ARGV[2])
local job_ttl, batch, reaped_llm = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local LEASES, DEADLINES = leases_key(reaped_llm), deadlines_key(reaped_llm)
local requeued, failed, missed = 0, 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, batch)) do
  local key = job_key(id)
  local state, llm, attempts, score, arrival = unpack(redis.call('HMGET', key, 'state', 'llm',
    'attempts', 'score', 'submitted_at'))
  if state == 'LEASED' or state == 'STREAMING' then
    attempts = tonumber(attempts)
    if attempts >= max_attempts then
      finish(id, 'FAILED', 'ERROR', 'the worker stopped heartbeating and the job was leased ' ..
        attempts .. ' times, the maximum (--max-attempts)', now, job_ttl)
      failed = failed + 1
    else
      requeue(id, llm, score, arrival, 'queued_at', now)
      count(llm, 'requeued')
      requeued = requeued + 1
    end
  else
    redis.call('ZREM', LEASES, id)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', DEADLINES, '-inf', now, 'LIMIT', 0, batch)) do
  local state, attempts = unpack(redis.call('HMGET', job_key(id), 'state', 'attempts'))
  if state == 'QUEUED' and tonumber(attempts) == 0 then
    finish(id, 'FAILED', 'DEADLINE', 'no worker started the job before its start deadline',
      now, job_ttl)
    missed = missed + 1
  else
    redis.call('ZREM', DEADLINES, id)
  end
end
return {requeued, failed, missed}
