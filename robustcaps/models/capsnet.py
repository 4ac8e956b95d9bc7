"""EM-routing matrix capsule network (placeholder until the capsule layers land)."""
