-- settle_v2.lua: end one admitted request (tail_service rate limiter). Idempotent.
--
-- KEYS (same hash tag {<subject>}): for the key bucket then the key-per-model bucket, 3 each:
--   log (ZSET "<id>|<tokens>" -> admitted ms), total (STRING), conc (ZSET id -> lease expiry ms).
-- ARGV: 1 request id, 2 tokens reserved at admission, 3 tokens used ("" = keep the reservation,
--   "cancel" = undo the admission: the request leaves the log as if it never came), 4..5 key has
--   tpm / conc ("1"/"0"), 6..7 model has tpm / conc.
-- While the request's open entry "<id>|<reserved>" is still in the window, it becomes
-- "<id>|<used>|s" (same admission time) and the total moves by the difference, never below zero;
-- a second call finds no open entry and changes nothing. The concurrency lease is removed.
-- Optionally KEYS[7..8] and ARGV[8]: the budget's spent counter and open reservations (see
-- admit_v2.lua) and the real cost in nano-dollars ("" = keep the reservation); the reservation
-- is replaced by the real cost once (cancel: by nothing).
-- Returns the number of buckets changed.

local id, reserved, used = ARGV[1], ARGV[2], ARGV[3]
local changed = 0
local cancel = used == 'cancel'
if used == '' then used = reserved end
if cancel then used = '0' end

for b = 0, 1 do
  local k = b * 3
  if cancel then
    -- an admission other limits refused: its log entry goes, whatever the bucket limits
    local open = id .. '|' .. reserved
    local removed = redis.call('ZREM', KEYS[k + 1], open)
    if removed == 0 then
      open = id .. '|0'
      removed = redis.call('ZREM', KEYS[k + 1], open)
    end
    if removed == 1 then
      local amt = tonumber(string.match(open, '|(%d+)$'))
      if amt > 0 then
        local new = math.max(0, tonumber(redis.call('GET', KEYS[k + 2]) or '0') - amt)
        if new > 0 then redis.call('SET', KEYS[k + 2], new, 'KEEPTTL') else redis.call('DEL', KEYS[k + 2]) end
      end
      changed = changed + 1
    end
  elseif ARGV[4 + b * 2] == '1' then
    local log, tot = KEYS[k + 1], KEYS[k + 2]
    local open = id .. '|' .. reserved
    local at = redis.call('ZSCORE', log, open)
    if at then
      redis.call('ZREM', log, open)
      redis.call('ZADD', log, at, id .. '|' .. used .. '|s')
      local delta = tonumber(used) - tonumber(reserved)
      if delta ~= 0 then
        local total = tonumber(redis.call('GET', tot) or '0')
        local new = math.max(0, total + delta)
        if new > 0 then
          redis.call('SET', tot, new, 'KEEPTTL')
          if redis.call('PTTL', tot) < 0 then redis.call('PEXPIRE', tot, redis.call('PTTL', log)) end
        else
          redis.call('DEL', tot)
        end
      end
      changed = changed + 1
    end
  end
  if cancel or ARGV[5 + b * 2] == '1' then
    changed = changed + redis.call('ZREM', KEYS[k + 3], id)
  end
end
if KEYS[8] then
  local held = redis.call('HGET', KEYS[8], id)
  if held then
    redis.call('HDEL', KEYS[8], id)
    local cost = ARGV[8]
    if cancel then cost = '0' elseif cost == nil or cost == '' then cost = held end
    local delta = tonumber(cost) - tonumber(held)
    if delta ~= 0 and redis.call('EXISTS', KEYS[7]) == 1 then
      if redis.call('INCRBY', KEYS[7], delta) < 0 then redis.call('SET', KEYS[7], 0, 'KEEPTTL') end
    end
    changed = changed + 1
  end
end
return changed
