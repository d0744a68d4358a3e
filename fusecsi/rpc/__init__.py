"""msgpack-RPC over stream sockets (TCP or unix): the cluster's protocol and mountd's API.

A frame is a 4-byte big-endian length and a msgpack array:
  request  [0, id, method, args]        reply [1, id, error, result]
`error` is None or [errno name, message]. Ids are chosen by the caller; many requests may be
in flight on one connection and replies come back in any order. Bulk data travels as msgpack
`bin`. When the server has a token, the first request must be `hello(token)`; anything else
(or a wrong token) is refused with EACCES and the connection is closed.

Modules: framing (frames on a socket), server, connection (one client connection), pool
(connections per address), addresses, blocking (one call outside trio), errors.
"""
