"""One process per GPU: the worker loop turns wire messages into engine requests and back.

wire/ is what crosses the pipe (the one part the front end imports); engine/ schedules and runs
requests; model/ is the Qwen3 forward in PyTorch (also the oracle of every kernel); attention/ and
kernels/ are the GPU implementations, chosen once in backends.py; loading/ turns a model argument
into weights.
"""
