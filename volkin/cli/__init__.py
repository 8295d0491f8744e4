"""`volkin`, the admin CLI: a client of the controller's admin API, and the dev cluster.

Each module has one reason to change:

    args.py      the command line: commands, flags, usage errors
    sizes.py     "64MiB" and friends, both ways
    output.py    tables, JSON and progress lines
    client.py    the connection to the controller and its errors
    commands.py  what each admin command does
    dev.py       `volkin dev up/status/down/demo` on top of volkin.devcluster
"""

import os

# gRPC's C core logs a failed TLS handshake on stderr by itself; a command says what
# went wrong in its own one line.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
