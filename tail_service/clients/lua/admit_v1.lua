-- admit_v1.lua: sliding-window-log admission for one request, atomically (tail_service rate limiter).
--
-- KEYS (all carry the same hash tag {<subject>}): for the key bucket then the key-per-model bucket,
--   5 each: req (ZSET id -> admitted ms), tok (ZSET id -> admitted ms), tokamt (HASH "a:"..id -> tokens,
--   "s:"..id -> settled marker), toktotal (STRING sum of tokamt), conc (ZSET id -> lease expiry ms).
-- ARGV: 1 window ms, 2 request id, 3 tokens to reserve, 4 lease ttl ms, 5 batch headroom (parts per
--   million), 6 "1" for batch priority, 7..9 key rpm/tpm/conc, 10..12 model rpm/tpm/conc (0 = none).
-- Returns {allowed 0/1, reason 0..6, limit_req, remaining_req, reset_req_ms, limit_tok, remaining_tok,
--   reset_tok_ms, retry_after_ms}. Reasons: 1 requests, 2 tokens, 3 concurrency, 4..6 the model ones.
-- Time is the server's (TIME, ms). An entry admitted at t is in the window while now < t + window.
-- Nothing is recorded unless every applicable limit passes; purging expired entries always happens.

local window = tonumber(ARGV[1])
local id = ARGV[2]
local tokens = tonumber(ARGV[3])
local lease_ttl = tonumber(ARGV[4])
local headroom_ppm = tonumber(ARGV[5])
local batch = ARGV[6] == '1'
local SLACK = 1000
local CHUNK = 500
local CONC_RETRY = 1000

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - window

-- the part of a limit batch requests must leave free: ceil(limit * headroom)
local function reserve(limit)
  if not batch then return 0 end
  return math.floor((limit * headroom_ppm + 999999) / 1000000)
end

-- PEXPIRE that never shortens an existing TTL
local function touch(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

-- ms until the newest entry of a window ZSET leaves the window (0 if empty)
local function reset_of(key)
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #newest == 0 then return 0 end
  return math.max(0, tonumber(newest[2]) + window - now)
end

-- sum of the amounts of ids in tokamt (chunked HMGET, missing fields count 0)
local function sum_amounts(hkey, ids, first, last)
  local total = 0
  local i = first
  while i <= last do
    local fields = {}
    for j = i, math.min(last, i + CHUNK - 1) do fields[#fields + 1] = 'a:' .. ids[j] end
    local vals = redis.call('HMGET', hkey, unpack(fields))
    for _, v in ipairs(vals) do if v then total = total + tonumber(v) end end
    i = i + CHUNK
  end
  return total
end

local checks = {}
local failed = {}
local reason = 0
local retry = 0

local function fail(idx, ms)
  if reason == 0 then reason = idx end
  failed[idx] = true
  retry = math.max(retry, ms)
end

for b = 0, 1 do
  local k = b * 5
  local rpm, tpm, conc = tonumber(ARGV[7 + b * 3]), tonumber(ARGV[8 + b * 3]), tonumber(ARGV[9 + b * 3])

  if rpm > 0 then
    local key = KEYS[k + 1]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
    local used = redis.call('ZCARD', key)
    local eff = rpm - reserve(rpm)
    local c = {kind = 'req', idx = b * 3 + 1, limit = rpm, used = used, ok = used + 1 <= eff}
    if not c.ok then
      local ms = window
      local need = used + 1 - eff -- entries that must leave the window first
      if eff >= 1 and need >= 1 then
        local e = redis.call('ZRANGE', key, need - 1, need - 1, 'WITHSCORES')
        if #e > 0 then ms = tonumber(e[2]) + window - now end
      end
      fail(c.idx, ms)
    end
    checks[#checks + 1] = c
  end

  if tpm > 0 then
    local zkey, hkey, skey = KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
    local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', cutoff)
    if #expired > 0 then
      local gone = sum_amounts(hkey, expired, 1, #expired)
      for i = 1, #expired, CHUNK do
        local fields = {}
        for j = i, math.min(#expired, i + CHUNK - 1) do
          fields[#fields + 1] = 'a:' .. expired[j]
          fields[#fields + 1] = 's:' .. expired[j]
        end
        redis.call('HDEL', hkey, unpack(fields))
      end
      redis.call('ZREMRANGEBYSCORE', zkey, '-inf', cutoff)
      if redis.call('EXISTS', skey) == 1 then redis.call('DECRBY', skey, gone) end
    end
    local total = tonumber(redis.call('GET', skey) or '0')
    if redis.call('ZCARD', zkey) == 0 and total ~= 0 then
      -- self-heal: nothing in the window means nothing reserved
      redis.call('DEL', skey, hkey)
      total = 0
    end
    if total < 0 then total = 0 end
    local eff = tpm - reserve(tpm)
    local c = {kind = 'tok', idx = b * 3 + 2, limit = tpm, used = total, ok = total + tokens <= eff}
    if not c.ok then
      local ms = window
      if tokens <= eff then
        -- walk from the oldest entry until enough tokens have left the window
        local freed, start, found = 0, 0, false
        while not found do
          local page = redis.call('ZRANGE', zkey, start, start + CHUNK - 1, 'WITHSCORES')
          if #page == 0 then break end
          local ids = {}
          for i = 1, #page, 2 do ids[#ids + 1] = page[i] end
          local fields = {}
          for i = 1, #ids do fields[i] = 'a:' .. ids[i] end
          local vals = redis.call('HMGET', hkey, unpack(fields))
          for i = 1, #ids do
            freed = freed + (tonumber(vals[i]) or 0)
            if total - freed + tokens <= eff then
              ms = tonumber(page[2 * i]) + window - now
              found = true
              break
            end
          end
          start = start + CHUNK
        end
      end
      fail(c.idx, ms)
    end
    checks[#checks + 1] = c
  end

  if conc > 0 then
    local key = KEYS[k + 5]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local live = redis.call('ZCARD', key)
    local eff = conc - reserve(conc)
    local c = {kind = 'conc', idx = b * 3 + 3, limit = conc, used = live, ok = live + 1 <= eff}
    if not c.ok then fail(c.idx, CONC_RETRY) end
    checks[#checks + 1] = c
  end
end

local allowed = reason == 0

if allowed then
  for b = 0, 1 do
    local k = b * 5
    if tonumber(ARGV[7 + b * 3]) > 0 then
      redis.call('ZADD', KEYS[k + 1], now, id)
      touch(KEYS[k + 1], window + SLACK)
    end
    if tonumber(ARGV[8 + b * 3]) > 0 then
      local zkey, hkey, skey = KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
      local old = tonumber(redis.call('HGET', hkey, 'a:' .. id) or '0')
      redis.call('ZADD', zkey, now, id)
      redis.call('HSET', hkey, 'a:' .. id, tokens)
      redis.call('HDEL', hkey, 's:' .. id)
      redis.call('INCRBY', skey, tokens - old)
      touch(zkey, window + SLACK)
      touch(hkey, window + SLACK)
      touch(skey, window + SLACK)
    end
    if tonumber(ARGV[9 + b * 3]) > 0 then
      redis.call('ZADD', KEYS[k + 5], now + lease_ttl, id)
      touch(KEYS[k + 5], lease_ttl + SLACK)
    end
  end
end

-- per kind, the limit to report: the one that rejected, else another failing one, else the one with
-- the smallest remaining (then the smallest limit)
local out = {allowed and 1 or 0, reason, 0, 0, 0, 0, 0, 0, 0}
for slot, kind in ipairs({'req', 'tok'}) do
  local best, best_rank, best_rem = nil, 0, 0
  for _, c in ipairs(checks) do
    if c.kind == kind then
      local rem = c.limit - c.used
      if allowed then rem = rem - (kind == 'req' and 1 or tokens) end
      rem = math.max(0, rem)
      local rank = 2
      if c.idx == reason then rank = 0 elseif failed[c.idx] then rank = 1 end
      if best == nil or rank < best_rank
        or (rank == best_rank and (rem < best_rem or (rem == best_rem and c.limit < best.limit))) then
        best, best_rank, best_rem = c, rank, rem
      end
    end
  end
  if best then
    local key = KEYS[(best.idx > 3 and 5 or 0) + (kind == 'req' and 1 or 2)]
    local base = 3 + (slot - 1) * 3
    out[base] = best.limit
    out[base + 1] = best_rem
    out[base + 2] = reset_of(key)
  end
end
if not allowed then out[9] = math.min(window, math.max(1, retry)) end
return out
