-- Leases up to max_jobs of the best queued jobs of the given LLMs to one worker, atomically:
-- a job leaves its queue and gets its lease in the same step, so no job is dispatched twice.
-- Order: a job that has waited longer than max_wait_s goes first (oldest of those first);
-- otherwise the lowest (score, job_id) across the LLMs' queues, as Redis orders a sorted set.
-- A never-started job past its start deadline is failed instead of leased.
-- ARGV: worker_id, lease_prefix, now ('': Redis's clock), lease_ttl_s, max_jobs, max_wait_s (0: off), job_ttl_s,
--       then the LLM names.
-- Returns one {job_id, lease_id, attempt, llm, prompt, sampling, predicted, next_index,
-- messages} per lease (messages: a chat job's conversation as JSON, '' for a prompt job).
local worker, lease_prefix = ARGV[1], ARGV[2]
local now, ttl = time_arg(ARGV[3]), tonumber(ARGV[4])
local max_jobs, max_wait, job_ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local llms = {}
for i = 8, #ARGV do llms[#llms + 1] = ARGV[i] end

local function pick()
  if max_wait > 0 then
    local oldest_id, oldest_llm, oldest_at
    for _, llm in ipairs(llms) do
      local head = redis.call('ZRANGE', arrivals_key(llm), 0, 0, 'WITHSCORES')
      if head[1] then
        local at = tonumber(head[2])
        if now - at > max_wait and (oldest_id == nil or at < oldest_at
            or (at == oldest_at and head[1] < oldest_id)) then
          oldest_id, oldest_llm, oldest_at = head[1], llm, at
        end
      end
    end
    if oldest_id then return oldest_id, oldest_llm end
  end
  local best_id, best_llm, best_score
  for _, llm in ipairs(llms) do
    local head = redis.call('ZRANGE', queue_key(llm), 0, 0, 'WITHSCORES')
    if head[1] then
      local score = tonumber(head[2])
      if best_id == nil or score < best_score or (score == best_score and head[1] < best_id) then
        best_id, best_llm, best_score = head[1], llm, score
      end
    end
  end
  return best_id, best_llm
end

local leased = {}
while #leased < max_jobs do
  local id, llm = pick()
  if id == nil then break end
  redis.call('ZREM', queue_key(llm), id)
  redis.call('ZREM', arrivals_key(llm), id)
  local key = job_key(id)
  local state, deadline_at, attempts, prompt, sampling, predicted, next_index, messages = unpack(
    redis.call('HMGET', key, 'state', 'deadline_at', 'attempts', 'prompt', 'sampling',
      'predicted_output_tokens', 'next_index', 'messages'))
  if state == 'QUEUED' then
    attempts = tonumber(attempts)
    deadline_at = tonumber(deadline_at)
    if attempts == 0 and deadline_at > 0 and now > deadline_at then
      finish(id, 'FAILED', 'DEADLINE', 'no worker started the job before its start deadline',
        now, job_ttl)
    else
      redis.call('ZREM', deadlines_key(llm), id)
      local lease_id = lease_prefix .. '-' .. (#leased + 1)
      attempts = attempts + 1
      redis.call('HSET', key, 'state', 'LEASED', 'lease_id', lease_id, 'worker_id', worker,
        'leased_at', now, 'lease_expires_at', now + ttl, 'attempts', attempts)
      redis.call('ZADD', leases_key(llm), now + ttl, id)
      redis.call('SADD', running_key(llm), id)
      leased[#leased + 1] = {id, lease_id, attempts, llm, prompt, sampling, predicted, next_index,
        messages or ''}
    end
  end
end
-- Jobs left behind get a fresh wake-up: one lost with a cancelled BLPOP (its client went
-- away after Redis popped it) is replaced, so no idle worker sleeps past queued work.
for _, llm in ipairs(llms) do
  if redis.call('ZCARD', queue_key(llm)) > 0 and redis.call('LLEN', notify_key(llm)) == 0 then
    notify(llm)
  end
end
return leased
