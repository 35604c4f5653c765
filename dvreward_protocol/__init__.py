"""What the DVReward service and its clients agree on: the wire format, questions, reward options, GRPO math.

A leaf: it imports pydantic and nothing else of the project, so the trainer client carries it
without the server (no `server` module in a trainer's environment) and both sides share one
definition of every field and formula.
"""
