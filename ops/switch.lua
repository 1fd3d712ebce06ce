-- Switch readers from the live profiles to a rebuilt namespace, atomically (one EVALSHA).
--
-- ARGV: live_prefix, namespace_prefix, state_key, n_rebuilt, rebuilt user ids..., then the ids of
-- live users absent from the rebuild (their profiles are deleted).
-- For each rebuilt user the namespace's profile:{u}, :items, :cats, :recent and seen:{u} are
-- RENAMEd over the live keys (a key the rebuild lacks is deleted live). A rebuilt profile whose
-- version is not above the live one gets version = live + 1, so profile versions never go back
-- and caches (which refuse older versions) accept the lists regenerated from it.
-- Returns {switched, removed, versions_bumped}.
local live = ARGV[1]
local ns = ARGV[2]
local state = ARGV[3]
local n = tonumber(ARGV[4])
local suffixes = { '', ':items', ':cats', ':recent' }

local function move(src, dst)
  if redis.call('EXISTS', src) == 1 then
    redis.call('RENAME', src, dst)
  else
    redis.call('DEL', dst)
  end
end

local bumped = 0
for i = 5, 4 + n do
  local user = ARGV[i]
  local new_key = ns .. 'profile:' .. user
  local live_key = live .. 'profile:' .. user
  local live_version = tonumber(redis.call('HGET', live_key, 'version'))
  local new_version = tonumber(redis.call('HGET', new_key, 'version')) or 0
  if live_version and live_version >= new_version then
    redis.call('HSET', new_key, 'version', live_version + 1)
    bumped = bumped + 1
  end
  for _, suffix in ipairs(suffixes) do
    move(new_key .. suffix, live_key .. suffix)
  end
  move(ns .. 'seen:' .. user, live .. 'seen:' .. user)
end

local removed = 0
for i = 5 + n, #ARGV do
  local key = live .. 'profile:' .. ARGV[i]
  redis.call('DEL', key, key .. ':items', key .. ':cats', key .. ':recent', live .. 'seen:' .. ARGV[i])
  removed = removed + 1
end
redis.call('HSET', state, 'phase', 'switched')
return { n, removed, bumped }
