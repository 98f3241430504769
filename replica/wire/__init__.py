"""What crosses the socket between the front end and a replica: messages and their framing.

No torch here, nor anything that imports it: the front end imports this package.
"""
