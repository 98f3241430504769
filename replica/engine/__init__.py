"""The engine: requests in, the scheduler picks each step's work, the model runner runs it."""
