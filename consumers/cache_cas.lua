-- Compare-and-set of one cached recommendation list (atomic: Redis runs a script alone).
-- KEYS[1] = the user's recs key; KEYS[2] = the same user's profile key (both built by Keys in
-- Python, one hash slot, so the script is valid on a cluster; no key is built from an id here).
-- ARGV[1] = the list's JSON; ARGV[2] = its profile_version; ARGV[3] = TTL in milliseconds.
-- Returns 1 written; 0 stale (the stored list has a newer profile_version; equal versions are
-- rewritten: a redelivery or a regenerated list for the same profile); 2 refused, its version is
-- ahead of the stored profile's (a forged or broken message must never lock the cache: the CAS
-- would refuse every real list below it for the whole TTL); 3 refused, the user has no profile.
local version = tonumber(ARGV[2])
local profile = tonumber(redis.call('HGET', KEYS[2], 'version'))
if profile == nil then
  return 3
end
if version == nil or version > profile then
  return 2
end
local current = redis.call('GET', KEYS[1])
if current then
  local ok, stored = pcall(cjson.decode, current)
  if ok and type(stored) == 'table' and tonumber(stored['profile_version']) ~= nil
      and tonumber(stored['profile_version']) > version then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
