"""What the tests start, one module each, imported as `from support.<module> import ...`
(tests/ is on pytest's pythonpath):

processes      fusecsi roles as subprocesses (the `spawn` fixture), their sockets and logs
mounts         `fusecsi mount` daemons over a LocalCluster, mount checks
mountd         a real `fusecsi mountd` (and in-process supervisors) over a LocalCluster
node           a node: LocalCluster, mountd and the CSI node plugin
controller     `fusecsi controller` processes and a small fake Kubernetes API server
faultproxy     a fault-injecting relay between a cluster client and the master
metrics        clusters that serve /metrics, and scraping it
helm           the helm binary and the chart rendered by it
takeover_load  a process living on a mount while its daemon is killed and replaced
"""
