"""Learner -> rollout weight transfer: the wire format and the transport both sides use (no role code)."""
