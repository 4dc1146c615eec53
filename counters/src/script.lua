-- toolgate: reserve every limit of one call, or none, atomically.
--
-- KEYS: per limit i, KEYS[2i-1] = sorted set of admissions (score = admission time in
--       microseconds, member = "<reservation id>:<i>:<units>"), KEYS[2i] = the units it holds.
-- ARGV[1] = "" to use the server's clock (TIME), or the time in microseconds (tests only).
-- ARGV[2] = reservation id (random, unique).
-- ARGV[3i], ARGV[3i+1], ARGV[3i+2] = window (microseconds), max, units of limit i.
-- Returns {1} when every limit was reserved, {0, i (0-based), retry_after_us or -1}
-- when limit i has no room (and nothing was reserved).
if redis.replicate_commands then redis.replicate_commands() end
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local rid = ARGV[2]

-- Numbers go to Redis as integer text: never in exponent form, never rounded.
local function int(x)
  return string.format('%d', x)
end

local function units(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

-- The units held in (now - window, now], after dropping older admissions.
local function live(z, s, window)
  local sum = redis.call('GET', s)
  if sum then
    sum = tonumber(sum)
  else
    sum = 0
    for _, m in ipairs(redis.call('ZRANGE', z, 0, -1)) do sum = sum + units(m) end
  end
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', int(now - window))
  if #old > 0 then
    for _, m in ipairs(old) do sum = sum - units(m) end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', int(now - window))
  end
  if sum < 0 then sum = 0 end
  return sum
end

local added = {}
local function undo()
  for j = #added, 1, -1 do
    local a = added[j]
    if redis.call('ZREM', a[1], a[3]) == 1 then redis.call('DECRBY', a[2], int(a[4])) end
  end
end

local n = #KEYS / 2
for i = 1, n do
  local z, s = KEYS[2 * i - 1], KEYS[2 * i]
  local window = tonumber(ARGV[3 * i])
  local max = tonumber(ARGV[3 * i + 1])
  local amount = tonumber(ARGV[3 * i + 2])
  if amount > max then
    undo()
    return {0, i - 1, -1}
  end
  if amount > 0 then
    local sum = live(z, s, window)
    if sum + amount > max then
      -- Exactly when enough units leave the window for this call to fit.
      local excess = sum + amount - max
      local entries = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
      local retry = -1
      for k = 1, #entries, 2 do
        excess = excess - units(entries[k])
        if excess <= 0 then
          retry = tonumber(entries[k + 1]) + window - now
          if retry < 1000 then retry = 1000 end
          break
        end
      end
      redis.call('SET', s, int(sum), 'PX', int(math.floor(window / 1000) + 1000))
      undo()
      return {0, i - 1, retry}
    end
    -- Admissions stay ordered by time even if the clock steps back: a late entry is
    -- recorded at the newest time, which only keeps it longer.
    local at = now
    local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
    if #last == 2 and tonumber(last[2]) > at then at = tonumber(last[2]) end
    local member = rid .. ':' .. int(i - 1) .. ':' .. int(amount)
    redis.call('ZADD', z, int(at), member)
    local ttl = math.floor((at - now + window) / 1000) + 1000
    redis.call('SET', s, int(sum + amount), 'PX', int(ttl))
    redis.call('PEXPIRE', z, int(ttl))
    added[#added + 1] = {z, s, member, amount}
  end
end
return {1}
