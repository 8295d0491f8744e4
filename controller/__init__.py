"""volkin-controller: host node 12 of the method.

Maps, copy-before-write rules, NBD export and the admin API.
"""
