"""The fleet: pools of slots, their supervision, restarts, and placement on devices."""
