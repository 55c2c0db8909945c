"""The DRL + convex solver: ``policy`` (numpy inference, what a service loads) and ``train`` (MaskablePPO)."""
