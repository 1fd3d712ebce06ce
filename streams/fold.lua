-- Fold a batch of clickstream events into per-user profiles, atomically (one EVALSHA per batch).
--
-- ARGV: prefix (unused: every key arrives built by recstream.keys.Keys), half_life_s, recent_max,
-- retention_s, rebase_after_s, shift_threshold, batch, item_keys, seen_max, items_max,
-- cats_max, idle_ttl_s, trend_base, trend_ttl_s.
-- batch is JSON: [[user_id, user_key_base, [[event_id, item_id, ts, weight], ...]], ...] (one
-- argument, because packing thousands of separate arguments costs the client more than the fold
-- costs Redis); a user's keys are user_key_base .. 'profile' | 'items' | 'cats' | 'recent' |
-- 'seen' (Keys.user_base: the id is escaped and hash-tagged there, never here). item_keys is
-- JSON {item_id: item key} for the batch's items (their catalog hashes, read for categories).
-- Weights are stored scaled to the profile's base time B: an event (w, t) adds w * 2^((t-B)/h).
-- Read at the reference time T (newest ts folded) a stored value s means s * 2^(-(T-B)/h), i.e.
-- the sum of w * 2^(-(T-t)/h): the same whatever order the events arrived in. When T runs more
-- than rebase_after_s past B, every stored value is rescaled and B moves to T (no overflow).
--
-- Bounds (0 = no bound): the seen-set keeps at most seen_max ids (the newest), the items and
-- categories hashes at most items_max / cats_max fields (the heaviest), and every key of a user
-- folded in this batch gets an idle TTL of idle_ttl_s seconds.
--
-- A user one of whose keys holds the wrong Redis type is left untouched (every user is checked
-- before the first write) and reported with version -1 and 'WRONGTYPE' in place of the trigger
-- event id, so the caller dead-letters that user's records while the rest of the batch folds.
--
-- Erasure: a user group may carry a fourth element, the 'topic:partition' its records came from,
-- and each of its events a fifth, its offset there. If the user's erased marker (user_key_base ..
-- 'erased', written by streams/erasure.py) holds a watermark for that partition, the events
-- below it are skipped and counted as erased: they belong to the history that was erased. One
-- HGET per such user per batch; events without an offset are never skipped. A fifth element of
-- the group is a watermark the caller knows from the users.erased topic: the higher one counts
-- (a Redis restored without the marker still skips the history).
--
-- Recent popularity (streams/trending.py): unless trend_base is '', each item new to a user's
-- profile adds one to the hash trend_base .. <day> (Keys.trending: the UTC day of the user's
-- newest event in the batch), in the same script as the fold, so a replay counts nothing again;
-- each hash touched gets a TTL of trend_ttl_s.
--
-- Returns per user: {user_id, version, folded, duplicates, late, emit, shift, trigger_event_id,
-- trigger_ts, erased, new_item...}; numbers that are not integers travel as strings.
--
-- Durable progress: the LAST three ARGV (counted from the end, so arguments added before them
-- do not move them) are offsets_key, offsets and notices. offsets is JSON [[field, next], ...]
-- (field 'topic:partition', next the offset after the batch's last record of that partition);
-- notices is JSON {user_id: [pending_key, field, first_offset, origin_ms]} (the user's partition
-- hash of pending change notices, its partition field, its first record in the batch, the
-- recs.origin_ts header or null). In the same script as the fold, each change notice decided
-- here is kept in its pending hash (user -> JSON [version, origin_ms, row...], the newest replacing an
-- older one) until the worker has seen Kafka take it, and each partition's stored offset moves
-- forward (never back) to `next`: Redis never holds a fold without its offset and its notice.
-- A refused user's records are dead-lettered only after this script, so its partition's offset
-- is held at the user's first record. offsets_key '' records nothing (rebuilds, tests).
-- An offsets entry may carry a third number, the offset the worker knows Redis holds for the
-- partition (what it read on assignment or stored since); if Redis holds less, or nothing, Redis
-- lost progress (it came back from an older state while the worker ran): the script writes
-- nothing and replies with an error starting 'PROGRESSLOST', so the worker restarts from Redis.
local h = tonumber(ARGV[2])
local recent_max = tonumber(ARGV[3])
local retention = tonumber(ARGV[4])
local rebase_after = tonumber(ARGV[5])
local threshold = tonumber(ARGV[6])
local batch = cjson.decode(ARGV[7])
local item_keys = cjson.decode(ARGV[8])
local seen_max = tonumber(ARGV[9])
local items_max = tonumber(ARGV[10])
local cats_max = tonumber(ARGV[11])
local idle_ttl = tonumber(ARGV[12])
local trend_base = ARGV[13]
local trend_ttl = tonumber(ARGV[14])
local trend_keys = {}
local progress_key = ARGV[#ARGV - 2]
local progress_offsets = cjson.decode(ARGV[#ARGV - 1])
local progress_notices = cjson.decode(ARGV[#ARGV])
if progress_key ~= '' then
  for _, entry in ipairs(progress_offsets) do
    local known = entry[3]
    if known ~= nil and known >= 0 then
      local stored = tonumber(redis.call('HGET', progress_key, entry[1]))
      if stored == nil or stored < known then
        return redis.error_reply(string.format('PROGRESSLOST %s holds %s, expected %d', entry[1],
          tostring(stored), known))
      end
    end
  end
end

local function fmt(x)
  return string.format('%.17g', x)
end

-- Lua's unpack() is limited to a few thousand values: long argument lists go in slices.
local SLICE = 1000

local function call_sliced(command, key, args, prefix_arg)
  local replies = {}
  for start = 1, #args, SLICE do
    local stop = math.min(start + SLICE - 1, #args)
    local reply
    if prefix_arg then
      reply = redis.call(command, key, prefix_arg, unpack(args, start, stop))
    else
      reply = redis.call(command, key, unpack(args, start, stop))
    end
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do
        replies[#replies + 1] = value
      end
    end
  end
  return replies
end

local categories_of = {}
local function categories(item)
  local cats = categories_of[item]
  if cats == nil then
    cats = {}
    -- pcall: a damaged catalog entry costs the item its categories, not the user's fold.
    local key = item_keys[item]
    local text = key and redis.pcall('HGET', key, 'categories')
    if type(text) == 'string' then
      for cat in string.gmatch(text, '[^|]+') do
        cats[#cats + 1] = cat
      end
    end
    categories_of[item] = cats
  end
  return cats
end

local function rescale(key, factor)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    return
  end
  local args = {}
  for j = 1, #flat, 2 do
    args[#args + 1] = flat[j]
    args[#args + 1] = fmt(tonumber(flat[j + 1]) * factor)
  end
  call_sliced('HSET', key, args)
end

local function read_hash(key)
  local flat = redis.call('HGETALL', key)
  local out = {}
  for j = 1, #flat, 2 do
    out[flat[j]] = tonumber(flat[j + 1])
  end
  return out
end

-- The category mix: affinities normalised to sum 1 (decay cancels out in the ratio).
local function mix(values)
  local total = 0
  for _, v in pairs(values) do
    if v > 0 then
      total = total + v
    end
  end
  local out = {}
  if total > 0 then
    for k, v in pairs(values) do
      if v > 0 then
        out[k] = v / total
      end
    end
  end
  return out
end

-- Keep the heaviest `limit` fields of a hash of weights (ties: the smaller field name stays).
local function cap_hash(key, limit)
  if limit <= 0 or redis.call('HLEN', key) <= limit then
    return false
  end
  local flat = redis.call('HGETALL', key)
  local entries = {}
  for j = 1, #flat, 2 do
    entries[#entries + 1] = { flat[j], tonumber(flat[j + 1]) or 0 }
  end
  table.sort(entries, function(a, b)
    if a[2] ~= b[2] then
      return a[2] < b[2]
    end
    return a[1] > b[1]
  end)
  local drop = {}
  for j = 1, #entries - limit do
    drop[#drop + 1] = entries[j][1]
  end
  call_sliced('HDEL', key, drop)
  return true
end

local EXPECTED = { profile = 'hash', items = 'hash', cats = 'hash', recent = 'zset', seen = 'zset' }
local KINDS = { 'profile', 'items', 'cats', 'recent', 'seen' }

local function wrong_type(base)
  for _, kind in ipairs(KINDS) do
    local found = redis.call('TYPE', base .. kind)['ok']
    if found ~= 'none' and found ~= EXPECTED[kind] then
      return true
    end
  end
  return false
end

-- Every user's keys are checked before the first write, so a refusal (or an error raised by
-- Redis itself on one of them, e.g. an ACL) leaves the whole batch unwritten.
local refused = {}
for index, group in ipairs(batch) do
  refused[index] = wrong_type(group[2])
end

local results = {}
for index, group in ipairs(batch) do
  local user = group[1]
  local base_key = group[2]
  local events = group[3]

  local pkey = base_key .. 'profile'
  local ikey = base_key .. 'items'
  local ckey = base_key .. 'cats'
  local rkey = base_key .. 'recent'
  local skey = base_key .. 'seen'

  local erased = 0
  if not refused[index] and group[4] then
    local watermark = tonumber(redis.call('HGET', base_key .. 'erased', group[4]))
    if group[5] ~= nil and (watermark == nil or group[5] > watermark) then
      watermark = group[5]
    end
    if watermark ~= nil then
      local kept = {}
      for _, ev in ipairs(events) do
        if ev[5] ~= nil and ev[5] < watermark then
          erased = erased + 1
        else
          kept[#kept + 1] = ev
        end
      end
      events = kept
    end
  end

  if refused[index] then
    results[#results + 1] = { user, -1, 0, 0, 0, 0, '0', 'WRONGTYPE', '0', 0 }
  elseif #events == 0 then
    -- Every event was erased history: nothing is written, no key is created or kept alive.
    local version = tonumber(redis.call('HGET', pkey, 'version')) or 0
    results[#results + 1] = { user, version, 0, 0, 0, 0, '0', '', '0', erased }
  else
    local state = redis.call('HMGET', pkey, 'version', 'events', 'ref_ts', 'base_ts', 'emitted_mix')
    local version = tonumber(state[1]) or 0
    local count = tonumber(state[2]) or 0
    local ref = tonumber(state[3])
    local base = tonumber(state[4])

    local newest = ref
    for _, ev in ipairs(events) do
      local ts = ev[3]
      if newest == nil or ts > newest then
        newest = ts
      end
    end
    if base == nil then
      base = newest
    elseif newest - base > rebase_after then
      local factor = 2 ^ (-(newest - base) / h)
      rescale(ikey, factor)
      rescale(ckey, factor)
      base = newest
    end
    local cutoff = newest - retention

    -- Values are summed here in doubles and written once per batch with 17 significant
    -- digits (HINCRBYFLOAT would round small values to 17 decimal places).
    local folded, duplicates, late = 0, 0, 0
    local deltas, order, newest_of = {}, {}, {}
    local cat_values, cats_touched = nil, {}
    local trigger_id, trigger_ts = nil, nil
    for _, ev in ipairs(events) do
      local event_id, item, ts, weight = ev[1], ev[2], ev[3], ev[4]
      if ts < cutoff then
        late = late + 1
      elseif redis.call('ZADD', skey, 'NX', ts, event_id) == 0 then
        duplicates = duplicates + 1
      else
        folded = folded + 1
        local scaled = weight * 2 ^ ((ts - base) / h)
        if deltas[item] == nil then
          deltas[item] = 0
          order[#order + 1] = item
        end
        deltas[item] = deltas[item] + scaled
        if newest_of[item] == nil or ts > newest_of[item] then
          newest_of[item] = ts
        end
        local cats = categories(item)
        if #cats > 0 then
          if cat_values == nil then
            cat_values = read_hash(ckey)
          end
          for _, cat in ipairs(cats) do
            cat_values[cat] = (cat_values[cat] or 0) + scaled / #cats
            cats_touched[cat] = true
          end
        end
        if trigger_ts == nil or ts >= trigger_ts then
          trigger_id, trigger_ts = event_id, ts
        end
      end
    end

    local emit, shift = 0, 0
    local new_items = {}
    if folded > 0 then
      local old = call_sliced('HMGET', ikey, order)
      local item_args, recent_args = {}, {}
      for j, item in ipairs(order) do
        local previous = tonumber(old[j])
        if previous == nil then
          new_items[#new_items + 1] = item
          previous = 0
        end
        item_args[#item_args + 1] = item
        item_args[#item_args + 1] = fmt(previous + deltas[item])
        recent_args[#recent_args + 1] = fmt(newest_of[item])
        recent_args[#recent_args + 1] = item
      end
      call_sliced('HSET', ikey, item_args)
      call_sliced('ZADD', rkey, recent_args, 'GT')
      redis.call('ZREMRANGEBYRANK', rkey, 0, -(recent_max + 1))
      redis.call('ZREMRANGEBYSCORE', skey, '-inf', '(' .. fmt(cutoff))
      if seen_max > 0 then
        redis.call('ZREMRANGEBYRANK', skey, 0, -(seen_max + 1))
      end
      cap_hash(ikey, items_max)
      if cat_values == nil then
        cat_values = read_hash(ckey)
      else
        local cat_args = {}
        for cat in pairs(cats_touched) do
          cat_args[#cat_args + 1] = cat
          cat_args[#cat_args + 1] = fmt(cat_values[cat])
        end
        call_sliced('HSET', ckey, cat_args)
        if cap_hash(ckey, cats_max) then
          cat_values = read_hash(ckey)
        end
      end
      version = version + 1
      local now_mix = mix(cat_values)
      local before = {}
      if state[5] then
        -- A damaged mix (written by hand) only costs the comparison, not the fold half-done.
        local ok, decoded = pcall(cjson.decode, state[5])
        if ok and type(decoded) == 'table' then
          before = decoded
        end
      end
      local distance = 0
      for k, v in pairs(now_mix) do
        distance = distance + math.abs(v - (before[k] or 0))
      end
      for k, v in pairs(before) do
        if now_mix[k] == nil then
          distance = distance + math.abs(v)
        end
      end
      shift = distance / 2
      local fields = {
        'version', version, 'events', count + folded, 'ref_ts', fmt(newest),
        'base_ts', fmt(base), 'half_life_s', fmt(h),
      }
      if #new_items > 0 or shift >= threshold then
        emit = 1
        fields[#fields + 1] = 'emitted_mix'
        fields[#fields + 1] = cjson.encode(now_mix)
      end
      redis.call('HSET', pkey, unpack(fields))
    end
    local row = {
      user, version, folded, duplicates, late, emit, fmt(shift), trigger_id or '',
      fmt(trigger_ts or 0), erased,
    }
    for _, item in ipairs(new_items) do
      row[#row + 1] = item
    end
    results[#results + 1] = row
    if trend_base ~= '' and #new_items > 0 then
      local tkey = trend_base .. string.format('%d', math.floor(trigger_ts / 86400))
      for _, item in ipairs(new_items) do
        redis.call('HINCRBY', tkey, item, 1)
      end
      trend_keys[tkey] = true
    end
    if idle_ttl > 0 then
      for _, kind in ipairs(KINDS) do
        redis.call('EXPIRE', base_key .. kind, idle_ttl)
      end
    end
  end
end

if trend_ttl > 0 then
  for tkey in pairs(trend_keys) do
    redis.call('EXPIRE', tkey, trend_ttl)
  end
end

if progress_key ~= '' then
  local held = {}
  for _, row in ipairs(results) do
    local notice = progress_notices[row[1]]
    if notice then
      if row[2] < 0 then
        local field, first = notice[2], notice[3]
        if held[field] == nil or first < held[field] then
          held[field] = first
        end
      elseif row[6] == 1 then
        redis.call('HSET', notice[1], row[1], cjson.encode({ row[2], notice[4], unpack(row) }))
      end
    end
  end
  for _, entry in ipairs(progress_offsets) do
    local field, next_offset = entry[1], entry[2]
    if held[field] ~= nil and held[field] < next_offset then
      next_offset = held[field]
    end
    local stored = tonumber(redis.call('HGET', progress_key, field))
    if stored == nil or next_offset > stored then
      redis.call('HSET', progress_key, field, string.format('%d', next_offset))
    end
  end
end
return results
