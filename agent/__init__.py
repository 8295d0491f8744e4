"""volkin-agent: one per storage node; owns that node's block store (data storage system 14(i))."""
