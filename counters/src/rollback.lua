-- toolgate: give back the units of one reservation (the call failed upstream).
-- KEYS: pairs (sorted set, units key) as in the reserve script; ARGV[i] = the member
-- reserved in pair i. An entry already gone (expired) gives nothing back twice.
for i = 1, #ARGV do
  local z, s = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('ZREM', z, ARGV[i]) == 1 then
    local units = tonumber(string.match(ARGV[i], ':(%d+)$')) or 0
    local left = redis.call('DECRBY', s, string.format('%d', units))
    if left <= 0 then redis.call('DEL', s) end
  end
end
return 1
