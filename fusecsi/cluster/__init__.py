"""The Curvine-style cluster: masters hold the namespace, workers hold the data.

protocol.py     msgpack-RPC framing, server, multiplexed client connections and pools
client.py       ClusterClient, the one API for the FUSE daemon, the controller and `fusecsi fs`
writebehind.py  the client's writes in flight to the workers
master/         `fusecsi master`: namespace.py (in-memory state), journal.py (WAL + checkpoints),
                service.py (RPC methods, placement, worker registry), main.py
worker/         `fusecsi worker`: store.py (checksummed block files), service.py, main.py
admin.py        `fusecsi fs`
local.py        LocalCluster: master + workers as subprocesses (tests, `fusecsi dev`)
roles.py        what the master and worker commands share (token, listening socket, metrics)
"""
