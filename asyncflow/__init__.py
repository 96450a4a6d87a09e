"""AsyncFlow: asynchronous, streaming RL post-training for LLMs.

Long-lived actors meet on NATS subjects (control plane) and Arrow Flight tickets (data plane).
See docs/architecture.md; start a run with `asyncflow run CONFIG`.
"""

__version__ = "0.1.0"
