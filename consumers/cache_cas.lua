-- Compare-and-set of one cached recommendation list (atomic: Redis runs a script alone).
-- KEYS[1] = recs:{user}; ARGV[1] = the list's JSON; ARGV[2] = its profile_version;
-- ARGV[3] = TTL in milliseconds.
-- Writes unless the stored list has a newer profile_version; equal versions are rewritten
-- (a redelivery or a regenerated list for the same profile). Returns 1 if written, 0 if stale.
local current = redis.call('GET', KEYS[1])
if current then
  local ok, stored = pcall(cjson.decode, current)
  if ok and type(stored) == 'table' and tonumber(stored['profile_version']) ~= nil
      and tonumber(stored['profile_version']) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
