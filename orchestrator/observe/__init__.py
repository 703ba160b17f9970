"""What the coordinator shows: the snapshot, status and health views, metrics, Prometheus."""
