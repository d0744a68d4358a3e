"""The Curvine-style cluster: masters hold the namespace, workers hold the data.

client.py       ClusterClient, the one API for the FUSE daemon, the controller and `fusecsi fs`
                (over fusecsi/rpc, the msgpack-RPC layer)
shortcircuit.py short-circuit block I/O, the client's half and the wire
writebehind.py  the client's writes in flight to the workers
master/         `fusecsi master`: namespace.py (in-memory state), journal.py (WAL + checkpoints),
                service.py (RPC methods, placement, worker registry), main.py
worker/         `fusecsi worker`: store.py (checksummed block files), service.py, main.py,
                shortcircuit.py (block descriptors for clients on the worker's host)
admin.py        `fusecsi fs`
local.py        LocalCluster: master + workers as subprocesses (tests, `fusecsi dev`)
roles.py        what the master and worker commands share (token, listening socket, metrics)
"""
