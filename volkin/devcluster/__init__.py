"""A local dev cluster: one etcd, N agents and one controller on loopback, in the background.

    state.py      what the cluster is (components, addresses, pids) in DIR/cluster.json
    processes.py  detached processes: start, is-it-still-ours, stop
    components.py how each kind of component is started and known to be healthy
    cluster.py    up (idempotent), status, down
    demo.py       the instant-refresh demo on a running cluster, checked over NBD

`volkin dev …` (volkin/cli/dev.py) is the command line on top of it.
"""
