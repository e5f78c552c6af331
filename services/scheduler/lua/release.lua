-- Gives back leases a worker never received (its Lease call was cancelled after the claim
-- ran): each job goes back to its queue as if never leased, its attempt not counted.
-- ARGV: pairs of job_id, lease_id. Returns how many were released.
local released = 0
for i = 1, #ARGV, 2 do
  local id, lease_id = ARGV[i], ARGV[i + 1]
  local state, current, llm, score, arrival, attempts, deadline_at = unpack(redis.call('HMGET',
    job_key(id), 'state', 'lease_id', 'llm', 'score', 'submitted_at', 'attempts', 'deadline_at'))
  if state == 'LEASED' and current == lease_id then
    attempts = tonumber(attempts) - 1
    requeue(id, llm, score, arrival, 'attempts', attempts)
    if attempts == 0 and tonumber(deadline_at) > 0 then
      redis.call('ZADD', deadlines_key(llm), deadline_at, id)
    end
    released = released + 1
  end
end
return released
