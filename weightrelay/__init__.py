"""weightrelay core: the tensor contract, data, objectives, metrics and worker plumbing
shared by every framework's worker and by the coordinator. Imports no deep-learning framework."""

__version__ = "0.1.0"
