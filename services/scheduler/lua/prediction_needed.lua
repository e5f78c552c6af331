-- Whether a job still needs the proxy model's prediction (the asynchronous submit path asks
-- only after a short grace, services/scheduler/prediction.py): only a QUEUED job does. A job a
-- worker took within the grace (it found an idle worker) never costs the predictor anything;
-- it is counted as prediction_unneeded.
-- ARGV: job_id. Returns 1 (still queued: predict it) or 0 (dispatched, finished or gone).
local key = job_key(ARGV[1])
local state, llm = unpack(redis.call('HMGET', key, 'state', 'llm'))
if state == 'QUEUED' then return 1 end
if llm then count(llm, 'prediction_unneeded') end
return 0
