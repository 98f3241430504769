"""From a model argument to weights on the device, one way: config -> source -> reader ->
weights -> model; servable.py refuses what we cannot serve before any of it runs."""
