"""Training: the backend-agnostic loop, engines, optimizer groups, schedules and checkpoints."""
