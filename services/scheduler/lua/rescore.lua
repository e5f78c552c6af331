-- Applies the proxy model's prediction to a job that was queued before it arrived (the
-- asynchronous submit path, services/scheduler/prediction.py).
-- ARGV: job_id, outcome ('predicted' | 'failed'), score, predicted_output_tokens,
--       predictor_version.
-- 'predicted': a job still QUEUED moves to its new score (queue and record, so a later
--   requeue keeps it); a job already leased, streaming or finished keeps everything: it was
--   dispatched before its prediction (counted as prediction_late).
-- 'failed': the predictor gave no answer; the job keeps its first-stage or fallback score and
--   its record says prediction_fallback.
-- Returns 'rescored' | 'late' | 'failed' | 'gone' (no such job).
local id, outcome = ARGV[1], ARGV[2]
local key = job_key(id)
local state, llm = unpack(redis.call('HMGET', key, 'state', 'llm'))
if not state then return 'gone' end
if outcome == 'failed' then
  redis.call('HSET', key, 'prediction_fallback', '1')
  count(llm, 'prediction_fallback')
  return 'failed'
end
local queue = queue_key(llm)
if state == 'QUEUED' and redis.call('ZSCORE', queue, id) then
  redis.call('ZADD', queue, 'XX', ARGV[3], id)
  redis.call('HSET', key, 'score', ARGV[3], 'predicted_output_tokens', ARGV[4],
    'predictor_version', ARGV[5])
  count(llm, 'rescored')
  return 'rescored'
end
count(llm, 'prediction_late')
return 'late'
