-- Queues a new job, or returns the job an earlier request with the same client id made.
-- Idempotent per job id: a repeat of a call that queued the job returns {'ok', job_id} again.
-- ARGV: job_id, client_request_id, llm, score, arrival, deadline_at (0: none),
--       max_queue_depth (0: unbounded), prediction_fallback (0/1), the record as a JSON
--       object of string values (one argument: far cheaper for the client to send than
--       dozens), the request's digest.
-- Returns {'ok', job_id} | {'dup', existing_job_id} | {'full', depth} |
--         {'conflict', existing_job_id} (the client id was used for a different request).
local id, crid, llm = ARGV[1], ARGV[2], ARGV[3]
local score, arrival, deadline_at = ARGV[4], ARGV[5], tonumber(ARGV[6])
local max_depth, fallback = tonumber(ARGV[7]), ARGV[8]
-- The job id is new for each submission, so a record under it means this very call already
-- ran: redis-py resent it after the connection dropped before the reply (connect() in
-- services/common/redis_store.py retries every command). Answer as that run did, and change
-- nothing: no second 'submitted' count, and no re-queue of a job a worker may since have
-- claimed (it would be dispatched twice).
if redis.call('EXISTS', job_key(id)) == 1 then return {'ok', id} end
local idem = idempotency_key(llm, crid)
if crid ~= '' then
  local existing = redis.call('GET', idem)
  if existing then
    local earlier_hash = redis.call('HGET', job_key(existing), 'request_hash')
    if earlier_hash and earlier_hash ~= '' and earlier_hash ~= ARGV[10] then
      return {'conflict', existing}
    end
    return {'dup', existing}
  end
end
local queue = queue_key(llm)
local depth = redis.call('ZCARD', queue)
if max_depth > 0 and depth >= max_depth then return {'full', tostring(depth)} end
if crid ~= '' then redis.call('SET', idem, id) end
local fields = {}
for name, value in pairs(cjson.decode(ARGV[9])) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', job_key(id), unpack(fields))
redis.call('ZADD', queue, score, id)
redis.call('ZADD', arrivals_key(llm), arrival, id)
if deadline_at > 0 then redis.call('ZADD', deadlines_key(llm), deadline_at, id) end
count(llm, 'submitted')
if fallback == '1' then count(llm, 'prediction_fallback') end
notify(llm)
return {'ok', id}
