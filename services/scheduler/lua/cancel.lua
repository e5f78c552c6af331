-- Cancels a job: a queued one leaves its queue, a leased one loses its lease (its worker is
-- told to stop in the directive answering its next report). A finished job is left alone.
-- ARGV: job_id, now ('': Redis's clock), job_ttl_s. Returns {state_after, cancelled (0/1)}, or {} when unknown.
local id, now, job_ttl = ARGV[1], time_arg(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HGET', job_key(id), 'state')
if not state then return {} end
if is_finished(state) then return {state, 0} end
finish(id, 'CANCELLED', 'CANCELLED', '', now, job_ttl)
return {'CANCELLED', 1}
