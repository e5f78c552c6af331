-- Applies a worker report, one JobProgress at a time: renews the lease, appends new tokens to
-- the job's event stream (indexes already stored are dropped, so a resent report is
-- harmless), and finishes the job when an outcome is given. Progress under a stale lease
-- changes nothing.
-- ARGV: now ('': Redis's clock), lease_ttl_s, job_ttl_s, completions_maxlen, then 11 values per JobProgress:
--       job_id, lease_id, first_index, token_count, token_ids (comma-separated), token_texts
--       (JSON array), finish_reason ('' when no outcome), error, prompt_tokens, prefill_s,
--       decode_s.
-- Returns one status per JobProgress: 'ok' | 'done' | 'cancelled' | 'finished' | 'lost' |
-- 'gap' (tokens skipped indexes: protocol error, the job is failed).
local now, ttl, job_ttl = time_arg(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local completions_maxlen = tonumber(ARGV[4])
local FIELDS = 11

local function append_tokens(id, key, next_index, first_index, token_count, ids, texts,
    first_token_at)
  local skip = next_index - first_index
  if skip >= token_count then return next_index end
  if skip > 0 then
    local all_ids, kept_ids, kept_texts = {}, {}, {}
    for token in string.gmatch(ids, '[^,]+') do all_ids[#all_ids + 1] = token end
    local all_texts = cjson.decode(texts)
    for i = skip + 1, token_count do
      kept_ids[#kept_ids + 1] = all_ids[i]
      kept_texts[#kept_texts + 1] = all_texts[i]
    end
    ids, texts = table.concat(kept_ids, ','), cjson.encode(kept_texts)
  end
  redis.call('XADD', events_key(id), '*', 'k', 'tokens', 'i', next_index, 'ids', ids,
    't', texts)
  next_index = next_index + token_count - skip
  redis.call('HSET', key, 'next_index', next_index, 'generated_tokens', next_index,
    'state', 'STREAMING')
  if tonumber(first_token_at) == 0 then redis.call('HSET', key, 'first_token_at', now) end
  return next_index
end

local function apply(base)
  local id, lease_id = ARGV[base], ARGV[base + 1]
  local first_index, token_count = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local reason = ARGV[base + 6]
  local key = job_key(id)
  local state, current_lease, next_index, first_token_at, llm = unpack(
    redis.call('HMGET', key, 'state', 'lease_id', 'next_index', 'first_token_at', 'llm'))
  if not state then return 'lost' end
  if state == 'CANCELLED' then return 'cancelled' end
  if is_finished(state) then return 'finished' end
  -- Only the holder of the job's current lease may report: never an empty lease id, never
  -- a job that is not leased (a QUEUED job's lease id is empty too).
  if lease_id == '' or current_lease ~= lease_id
      or (state ~= 'LEASED' and state ~= 'STREAMING') then
    return 'lost'
  end

  redis.call('ZADD', leases_key(llm), 'XX', now + ttl, id)
  redis.call('HSET', key, 'lease_expires_at', now + ttl)
  next_index = tonumber(next_index)
  if token_count > 0 then
    if first_index > next_index then
      finish(id, 'FAILED', 'ERROR', 'worker reported token index ' .. first_index ..
        ' but the next expected index was ' .. next_index, now, job_ttl)
      return 'gap'
    end
    next_index = append_tokens(id, key, next_index, first_index, token_count,
      ARGV[base + 4], ARGV[base + 5], first_token_at)
  end
  if reason == '' then return 'ok' end

  local final = 'DONE'
  if reason == 'ERROR' then final = 'FAILED' elseif reason == 'CANCELLED' then
    final = 'CANCELLED' end
  redis.call('HSET', key, 'prompt_tokens', ARGV[base + 8], 'prefill_s', ARGV[base + 9],
    'decode_s', ARGV[base + 10])
  finish(id, final, reason, ARGV[base + 7], now, job_ttl)
  if final == 'DONE' then
    -- Training data for the proxy model: the prompt and the length the LLM really answered.
    local prompt, predicted, fallback = unpack(redis.call('HMGET', key, 'prompt',
      'predicted_output_tokens', 'prediction_fallback'))
    redis.call('XADD', completions_key(llm), 'MAXLEN', '~', completions_maxlen, '*',
      'job_id', id, 'llm', llm, 'prompt', prompt, 'generated_tokens', next_index,
      'finish_reason', reason, 'predicted_output_tokens', predicted,
      'prediction_fallback', fallback, 'finished_at', now)
  end
  return 'done'
end

local statuses = {}
for base = 5, #ARGV, FIELDS do statuses[#statuses + 1] = apply(base) end
return statuses
