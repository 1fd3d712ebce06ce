-- Switch readers from the live profiles to a rebuilt namespace, atomically (one EVAL).
--
-- KEYS: the rebuild's state hash; then, per rebuilt user, its k namespace keys followed by its k
-- live keys; then, per live user absent from the rebuild, its k live keys. Each group of k keys
-- starts with the profile hash (fields version and ref_ts, the time of the newest event folded).
-- Python builds every key with recstream.keys.Keys: this script never builds a user's key.
-- ARGV: n_rebuilt, k, horizon (epoch seconds, or 'none' when the rebuild read all history).
--
-- A rebuilt user's namespace keys are RENAMEd over the live ones (a key the rebuild lacks is
-- deleted live). A rebuilt profile whose version is not above the live one gets version =
-- live + 1, so versions never go back and caches (which refuse older versions) accept the lists
-- regenerated from it. A live user absent from the rebuild is deleted only when the rebuild
-- could have seen its events: with no horizon (every partition read from offset 0), or when
-- its newest event is after the horizon. One whose newest event is before it (its history fell
-- out of the topic's retention, or before --from-time) is kept: what a rebuild cannot see, it
-- keeps.
-- Returns {switched, removed, kept, versions_bumped}.
local n = tonumber(ARGV[1])
local k = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3]) -- nil for 'none'

local function move(src, dst)
  if redis.call('EXISTS', src) == 1 then
    redis.call('RENAME', src, dst)
  else
    redis.call('DEL', dst)
  end
end

local bumped = 0
local at = 2
for _ = 1, n do
  local new_profile, live_profile = KEYS[at], KEYS[at + k]
  local live_version = tonumber(redis.call('HGET', live_profile, 'version'))
  local new_version = tonumber(redis.call('HGET', new_profile, 'version')) or 0
  if live_version and live_version >= new_version then
    redis.call('HSET', new_profile, 'version', live_version + 1)
    bumped = bumped + 1
  end
  for j = 0, k - 1 do
    move(KEYS[at + j], KEYS[at + k + j])
  end
  at = at + 2 * k
end

local removed, kept = 0, 0
while at <= #KEYS do
  local newest = tonumber(redis.call('HGET', KEYS[at], 'ref_ts'))
  if horizon == nil or (newest ~= nil and newest > horizon) then
    redis.call('DEL', unpack(KEYS, at, at + k - 1))
    removed = removed + 1
  else
    kept = kept + 1
  end
  at = at + k
end
redis.call('HSET', KEYS[1], 'phase', 'switched')
return { n, removed, kept, bumped }
