"""Lua scripts run atomically on the Redis server (loaded once, called by EVALSHA).

redis-py's ``Script`` objects re-load a script on ``NOSCRIPT`` (e.g. after a server restart).
Lease scripts touch the attached keys they find in a lease's key set, so this backend targets a
single Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

#: KEYS: head, log, notify, cluster-id, stream keys...
#: ARGV: expected cluster id ('' = unknown), new cluster id, min head, expected stream lengths...,
#:       then (stream index, body) pairs in batch order.
#: Returns {1, first position, cluster id} | {0, stream index, current length}
#:       | {-1, server cluster id or ''} | {-2, server head}.
APPEND = r"""
local S = #KEYS - 4
local cid = redis.call('GET', KEYS[4])
if ARGV[1] ~= '' and cid ~= ARGV[1] then
  if cid then return {-1, cid} else return {-1, ''} end
end
local head = tonumber(redis.call('GET', KEYS[1]) or '0')
if head < tonumber(ARGV[3]) then return {-2, tostring(head)} end
for i = 1, S do
  local n = redis.call('LLEN', KEYS[4 + i])
  if n ~= tonumber(ARGV[3 + i]) then return {0, i, n} end
end
if not cid then
  cid = ARGV[2]
  redis.call('SET', KEYS[4], cid)
end
local first = head + 1
local pos = head
for j = 4 + S, #ARGV, 2 do
  pos = pos + 1
  local rec = string.format('%d', pos) .. '|' .. ARGV[j + 1]
  redis.call('RPUSH', KEYS[2], rec)
  redis.call('RPUSH', KEYS[4 + tonumber(ARGV[j])], rec)
end
local spos = string.format('%d', pos)
redis.call('SET', KEYS[1], spos)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '128', spos .. '-1', 'h', spos)
return {1, first, cid}
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
