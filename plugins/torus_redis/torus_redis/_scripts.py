"""Lua scripts run atomically on the Redis server (loaded once, called by EVALSHA).

redis-py's ``Script`` objects re-load a script on ``NOSCRIPT`` (e.g. after a server restart).
Lease scripts touch the attached keys they find in a lease's key set, so this backend targets a
single Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

#: Appends a group of batches (group commit), each checked and applied on its own, in order.
#: KEYS: head, log, notify, cluster-id, then each batch's S stream keys in turn.
#: ARGV: new cluster id ('' if every caller knows one), number of batches, then per batch:
#:       expected cluster id ('' = unknown); a header of space-separated integers
#:       ``min_head S (stream number, expected length) * S E (stream number) * E`` (stream
#:       numbers 1..S refer to the batch's own stream keys); then the E event bodies in order.
#: Returns a flat array: per batch {1, first position, 0} | {0, stream number in the batch,
#:       current length} | {-1, server cluster id or '', 0} | {-2, server head, 0}; then the
#:       server's cluster id ('' if none). A refused batch writes nothing; later batches see the
#:       effects of earlier ones (so two batches of one stream in one call are checked in order).
APPEND_GROUP = r"""
local ids = redis.call('MGET', KEYS[4], KEYS[1])
local cid = ids[1]
local head = tonumber(ids[2] or '0')
local out = {}
local a = 3
local base = 4
local committed = false
for b = 1, tonumber(ARGV[2]) do
  local exp_cid = ARGV[a]
  local h = {}
  for n in string.gmatch(ARGV[a + 1], '%d+') do h[#h + 1] = tonumber(n) end
  a = a + 2
  local ns = h[2]
  local ne = h[3 + 2 * ns]
  local status, x, y = 1, 0, 0
  if exp_cid ~= '' and cid ~= exp_cid then
    status = -1
    x = cid or ''
  elseif head < h[1] then
    status = -2
    x = string.format('%d', head)
  else
    for i = 1, ns do
      local n = redis.call('LLEN', KEYS[base + h[1 + 2 * i]])
      if n ~= h[2 + 2 * i] then
        status, x, y = 0, i, n
        break
      end
    end
  end
  if status == 1 then
    if not cid then
      cid = ARGV[1]
      redis.call('SET', KEYS[4], cid)
    end
    x = head + 1
    local recs = {}
    for e = 1, ne do
      head = head + 1
      local rec = string.format('%d', head) .. '|' .. ARGV[a + e - 1]
      recs[e] = rec
      redis.call('RPUSH', KEYS[base + h[3 + 2 * ns + e]], rec)
    end
    for i = 1, ne, 1000 do
      redis.call('RPUSH', KEYS[2], unpack(recs, i, math.min(i + 999, ne)))
    end
    committed = true
  end
  a = a + ne
  base = base + ns
  out[#out + 1] = status
  out[#out + 1] = x
  out[#out + 1] = y
end
if committed then
  local spos = string.format('%d', head)
  redis.call('SET', KEYS[1], spos)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '128', spos .. '-1', 'h', spos)
end
out[#out + 1] = cid or ''
return out
"""

#: KEYS: kv key, lease key, lease key-set. ARGV: lease id ('0' = none), value, nx ('1'/'0').
#: Returns 1 set, 0 not set (nx and exists), -1 lease not found.
PUT = r"""
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[1] == '0' then
  redis.call('SET', KEYS[1], '0|' .. ARGV[2])
  return 1
end
local pttl = redis.call('PTTL', KEYS[2])
if pttl <= 0 then return -1 end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', pttl)
redis.call('SADD', KEYS[3], KEYS[1])
if redis.call('PTTL', KEYS[3]) < pttl then redis.call('PEXPIRE', KEYS[3], pttl) end
return 1
"""

#: KEYS: lease key, lease key-set. ARGV: lease id. Returns 1, or 0 if the lease is gone.
KEEPALIVE = r"""
local ttl = redis.call('GET', KEYS[1])
if not ttl then return 0 end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local tag = ARGV[1] .. '|'
for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local v = redis.call('GET', k)
  if v and string.sub(v, 1, #tag) == tag then
    redis.call('PEXPIRE', k, ttl)
  else
    redis.call('SREM', KEYS[2], k)
  end
end
return 1
"""

#: KEYS: lease key, lease key-set. ARGV: lease id. Deletes the keys still owned by the lease.
REVOKE = r"""
local tag = ARGV[1] .. '|'
for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local v = redis.call('GET', k)
  if v and string.sub(v, 1, #tag) == tag then redis.call('DEL', k) end
end
redis.call('DEL', KEYS[2])
return redis.call('DEL', KEYS[1])
"""

#: KEYS: kv key. ARGV: '1' + expected value, or '0'. Returns 1 if deleted.
DELETE = r"""
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if ARGV[1] ~= '0' then
  local sep = string.find(v, '|', 1, true)
  if string.sub(v, sep + 1) ~= string.sub(ARGV[1], 2) then return 0 end
end
redis.call('DEL', KEYS[1])
return 1
"""
