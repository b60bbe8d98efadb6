-- admit_v2.lua: sliding-window-log admission for one request, atomically (tail_service rate limiter).
--
-- KEYS (all carry the same hash tag {<subject>}): for the key bucket then the key-per-model bucket,
--   3 each: log (ZSET "<id>|<tokens>" -> admitted ms; "<id>|<tokens>|s" once settled), total (STRING:
--   the tokens of the members of log), conc (ZSET id -> lease expiry ms).
-- ARGV: 1 window ms, 2 request id, 3 tokens to reserve, 4 lease ttl ms, 5 batch headroom (parts per
--   million), 6 "1" for batch priority, 7..9 key rpm/tpm/conc, 10..12 model rpm/tpm/conc (0 = none),
--   and optionally a budget: 13 its limit in nano-dollars (0 = none), 14 the cost to reserve, 15 unix
--   ms its period ends (0 = never), with KEYS[7] (STRING: nano-dollars spent or reserved in the
--   period) and KEYS[8] (HASH: request id -> cost reserved and not settled yet).
-- Returns {allowed 0/1, reason 0..7, limit_req, remaining_req, reset_req_ms, limit_tok, remaining_tok,
--   reset_tok_ms, retry_after_ms, budget spent before this request}. Reasons: 1 requests, 2 tokens,
--   3 concurrency, 4..6 the model ones, 7 the budget.
-- Time is the server's (TIME, ms). An entry admitted at t is in the window while now < t + window.
-- The requests in the window are the members of log; the tokens are the sum of their amounts, kept in
-- total. Nothing is recorded unless every applicable limit passes; purging expired entries always
-- happens. Every command is O(log n) or O(expired entries), except the walk for a token rejection's
-- retry time.

local window = tonumber(ARGV[1])
local id = ARGV[2]
local tokens = tonumber(ARGV[3])
local lease_ttl = tonumber(ARGV[4])
local headroom_ppm = tonumber(ARGV[5])
local batch = ARGV[6] == '1'
local SLACK = 1000
local PAGE = 500
local CONC_RETRY = 1000

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - window

-- the tokens of a log member: "<id>|<n>" or "<id>|<n>|s" (the id itself may contain '|')
local function amount(member)
  return tonumber(string.match(member, '|(%d+)$') or string.match(member, '|(%d+)|s$') or '0')
end

-- the part of a limit batch requests must leave free: ceil(limit * headroom)
local function reserve(limit)
  if not batch then return 0 end
  return math.floor((limit * headroom_ppm + 999999) / 1000000)
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
  local k = b * 3
  local rpm, tpm, conc = tonumber(ARGV[7 + b * 3]), tonumber(ARGV[8 + b * 3]), tonumber(ARGV[9 + b * 3])

  if rpm > 0 or tpm > 0 then
    local log, tot = KEYS[k + 1], KEYS[k + 2]
    local expired = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
    local total = tonumber(redis.call('GET', tot) or '0')
    if #expired > 0 then
      for _, m in ipairs(expired) do total = total - amount(m) end
      redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    end
    local count = redis.call('ZCARD', log)
    if count == 0 then total = 0 end -- self-heal: nothing in the window means nothing reserved
    if total < 0 then total = 0 end
    if #expired > 0 or count == 0 then
      if total > 0 then redis.call('SET', tot, total, 'PX', window + SLACK) else redis.call('DEL', tot) end
    end

    if rpm > 0 then
      local eff = rpm - reserve(rpm)
      local c = {kind = 'req', idx = b * 3 + 1, limit = rpm, used = count, ok = count + 1 <= eff, key = log}
      if not c.ok then
        local ms = window
        local need = count + 1 - eff -- entries that must leave the window first
        if eff >= 1 and need >= 1 then
          local e = redis.call('ZRANGE', log, need - 1, need - 1, 'WITHSCORES')
          if #e > 0 then ms = tonumber(e[2]) + window - now end
        end
        fail(c.idx, ms)
      end
      checks[#checks + 1] = c
    end

    if tpm > 0 then
      local eff = tpm - reserve(tpm)
      local c = {kind = 'tok', idx = b * 3 + 2, limit = tpm, used = total, ok = total + tokens <= eff, key = log}
      if not c.ok then
        local ms = window
        if tokens <= eff then
          -- walk from the oldest entry until enough tokens have left the window
          local freed, start, found = 0, 0, false
          while not found do
            local page = redis.call('ZRANGE', log, start, start + PAGE - 1, 'WITHSCORES')
            if #page == 0 then break end
            for i = 1, #page, 2 do
              freed = freed + amount(page[i])
              if total - freed + tokens <= eff then
                ms = tonumber(page[i + 1]) + window - now
                found = true
                break
              end
            end
            start = start + PAGE
          end
        end
        fail(c.idx, ms)
      end
      checks[#checks + 1] = c
    end
  end

  if conc > 0 then
    local key = KEYS[k + 3]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local live = redis.call('ZCARD', key)
    local eff = conc - reserve(conc)
    local c = {kind = 'conc', idx = b * 3 + 3, limit = conc, used = live, ok = live + 1 <= eff}
    if not c.ok then fail(c.idx, CONC_RETRY) end
    checks[#checks + 1] = c
  end
end

local budget_limit = tonumber(ARGV[13] or '0')
local budget_cost = tonumber(ARGV[14] or '0')
local budget_end = tonumber(ARGV[15] or '0')
local budget_spent = 0
if budget_limit > 0 then
  budget_spent = tonumber(redis.call('GET', KEYS[7]) or '0')
  if budget_spent + budget_cost > budget_limit then
    local ms = window
    if budget_end > 0 then ms = budget_end - now end
    fail(7, ms)
  end
end

local allowed = reason == 0

if allowed and budget_limit > 0 then
  local fresh = redis.call('EXISTS', KEYS[7]) == 0
  redis.call('INCRBY', KEYS[7], budget_cost)
  redis.call('HSET', KEYS[8], id, budget_cost)
  if fresh and budget_end > 0 then -- the period's first admission: its counters end a day after it
    redis.call('PEXPIREAT', KEYS[7], budget_end + 86400000)
    redis.call('PEXPIREAT', KEYS[8], budget_end + 86400000)
  end
end

if allowed then
  for b = 0, 1 do
    local k = b * 3
    local rpm, tpm = tonumber(ARGV[7 + b * 3]), tonumber(ARGV[8 + b * 3])
    if rpm > 0 or tpm > 0 then
      local amt = tpm > 0 and tokens or 0
      redis.call('ZADD', KEYS[k + 1], now, id .. '|' .. amt)
      redis.call('PEXPIRE', KEYS[k + 1], window + SLACK)
      if amt > 0 then
        redis.call('INCRBY', KEYS[k + 2], amt)
        redis.call('PEXPIRE', KEYS[k + 2], window + SLACK)
      end
    end
    if tonumber(ARGV[9 + b * 3]) > 0 then
      redis.call('ZADD', KEYS[k + 3], now + lease_ttl, id)
      redis.call('PEXPIRE', KEYS[k + 3], lease_ttl + SLACK)
    end
  end
end

-- ms until the newest entry of a log leaves the window (0 if empty); when this request was just
-- recorded, that is the whole window
local function reset_of(key)
  if allowed then return window end
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #newest == 0 then return 0 end
  return math.max(0, tonumber(newest[2]) + window - now)
end

-- per kind, the limit to report: the one that rejected, else another failing one, else the one with
-- the smallest remaining (then the smallest limit)
local out = {allowed and 1 or 0, reason, 0, 0, 0, 0, 0, 0, 0, budget_spent}
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
    local base = 3 + (slot - 1) * 3
    out[base] = best.limit
    out[base + 1] = best_rem
    out[base + 2] = reset_of(best.key)
  end
end
if not allowed then out[9] = math.min(window, math.max(1, retry)) end
return out
